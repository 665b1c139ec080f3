"""Transient read faults at the syscall level: an LD_PRELOAD shim (tests/faults/failopen.c, built here with the
system C compiler) fails ``open()`` of chosen images or data files (jsonl, a ``.json`` array, parquet, a
``save_to_disk`` folder's Arrow file) with EIO / ESTALE / ENOTCONN, as an NFS or FUSE volume does under load.
Validate must retry them (and count the retries), never turn them into rejects, and fail the task naming the
path when they outlast the retries."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT

SHIM = ROOT / "tests" / "faults" / "failopen.c"
# what an installed library logs at import in this environment (torchao built for another torch), not ours
THIRD_PARTY_NOISE = ("Skipping import of cpp extensions",)


@pytest.fixture(scope="module")
def failopen(tmp_path_factory) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH to build the LD_PRELOAD fault shim tests/faults/failopen.c")
    out = tmp_path_factory.mktemp("shim") / "failopen.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(SHIM), "-ldl"], check=True)
    return out


def _validate(
    tmp_path: Path, ckpt: Path, src: Path, shim: Path, faults: dict[str, int], times: int, formatting: str = "ufx"
):
    """``docev validate`` in a child process with the shim preloaded; (exit code, stderr, injected faults)."""
    log = tmp_path / "faults.log"
    options = {"retries": 3, "backoff_seconds": 0.01}
    datasets = [{"source": str(src), "name": "nfs", "formatting": formatting, "storage_options": options}]
    args = [f"output_dir={tmp_path / 'out'}", f"tokenizer.model_name_or_path={ckpt}", "synthetic=null",
            f"datasets={json.dumps(datasets)}", "validate.thumbnails=0"]  # fmt: skip
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FAILOPEN_PATHS": ":".join(f"{path}={code}" for path, code in faults.items()),
        "FAILOPEN_TIMES": str(times),
        "FAILOPEN_LOG": str(log),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "docev.cli", "validate", "--config", str(CONFIGS / "tiny.yaml"), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    injected = log.read_text().splitlines() if log.exists() else []
    return done.returncode, done.stderr, injected


def _images(src: Path) -> list[str]:
    records = [json.loads(line) for line in (src / "data.jsonl").read_text().splitlines()]
    return [r["image_files"][0] for r in records[:3]]


def test_a_transient_open_fault_is_retried_and_counted_not_rejected(tmp_path, tiny_checkpoint, synth_sources, failopen):
    src = synth_sources["instruct"]
    images = _images(src)
    faults = dict(zip(images, (errno.EIO, errno.ESTALE, errno.ENOTCONN), strict=True))
    code, stderr, injected = _validate(tmp_path, tiny_checkpoint, src, failopen, faults, times=1)
    assert code == 0, stderr
    # the shim really failed the first open of each image, once, with its errno
    assert sorted(line.split()[0] for line in injected) == sorted(str(e) for e in faults.values())
    assert {Path(line.split(maxsplit=1)[1]).relative_to(src).as_posix() for line in injected} == set(images)
    report = json.loads((tmp_path / "out" / "validate" / "report.json").read_text())["sources"]["nfs"]
    assert report["rejected"] == 0 and report["accepted"] == report["read"] == 20
    assert report["retries"] == 3
    assert (tmp_path / "out" / "validate" / "rejects.jsonl").read_text() == ""
    assert "nfs: retries 3" in (tmp_path / "out" / "validate" / "report.md").read_text()


def test_a_fault_that_outlasts_the_retries_fails_the_task_naming_the_path(
    tmp_path, tiny_checkpoint, synth_sources, failopen
):
    src = synth_sources["instruct"]
    image = _images(src)[1]
    code, stderr, injected = _validate(tmp_path, tiny_checkpoint, src, failopen, {image: errno.ESTALE}, times=-1)
    assert code == 75, stderr  # EX_TEMPFAIL: the pipeline's retry of this task may succeed
    assert len(injected) == 4  # the first open and its 3 retries
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith(THIRD_PARTY_NOISE)]
    assert len(lines) == 1, stderr
    assert str(src / image) in lines[0] and "Stale file handle" in lines[0] and "3 retries" in lines[0]
    # nothing was written as a reject, and no part (or half-written part folder) was left behind
    validate = tmp_path / "out" / "validate"
    assert not (validate / "rejects.jsonl").exists() and not (validate / "manifest.jsonl").exists()
    assert not any(p.is_file() for p in validate.rglob("*")), sorted(validate.rglob("*"))


# the data file of each local source format, as the shim matches it (a substring of the opened path)
DATA_FILES = {"jsonl": "data.jsonl", "json": "data.json", "parquet": "data.parquet", "hf": ".arrow"}


@pytest.fixture(scope="module", params=sorted(DATA_FILES))
def table_source(request, tmp_path_factory, synth_sources) -> tuple[str, Path, list[str]]:
    """(format, source folder, record ids): the session's synthetic pages written as that format (images copied);
    ``json`` is an array in the ``messages`` formatting, the shape a ``.json`` source file takes."""
    from docev.synth import write_source

    fmt, base = request.param, synth_sources["instruct"]
    records = [json.loads(line) for line in (base / "data.jsonl").read_text().splitlines()]
    src = tmp_path_factory.mktemp(f"src-{fmt}") / "instruct"
    shutil.copytree(base / "images", src / "images")
    if fmt == "json":
        rows = [{"id": r["id"], "messages": r["context"], "images": r["image_files"]} for r in records]
        (src / "data.json").write_text(json.dumps(rows))
    else:
        write_source(records, src, fmt)
    return fmt, src, [r["id"] for r in records]


def _formatting(fmt: str) -> str:
    return "messages" if fmt == "json" else "ufx"


def test_a_transient_data_file_fault_is_retried_to_the_same_accepted_set(
    tmp_path, tiny_checkpoint, table_source, failopen
):
    fmt, src, ids = table_source
    faults = {DATA_FILES[fmt]: errno.EIO}
    code, stderr, injected = _validate(tmp_path, tiny_checkpoint, src, failopen, faults, 1, _formatting(fmt))
    assert code == 0, stderr
    assert [line.split()[0] for line in injected] == [str(errno.EIO)], injected  # the first open failed, once
    assert DATA_FILES[fmt] in injected[0]
    validate = tmp_path / "out" / "validate"
    accepted = [json.loads(line)["id"] for line in (validate / "manifest.jsonl").read_text().splitlines()]
    assert sorted(accepted) == sorted(ids)  # every record, as a fault-free run accepts (the first test)
    assert (validate / "rejects.jsonl").read_text() == ""


def test_a_data_file_fault_that_outlasts_the_retries_fails_the_task(tmp_path, tiny_checkpoint, table_source, failopen):
    fmt, src, _ = table_source
    faults = {DATA_FILES[fmt]: errno.EIO}
    code, stderr, injected = _validate(tmp_path, tiny_checkpoint, src, failopen, faults, -1, _formatting(fmt))
    assert code == 75, stderr  # EX_TEMPFAIL, not a traceback's 1 nor a reject
    assert len(injected) == 4, injected  # the first open and its 3 retries
    path = injected[0].split(maxsplit=1)[1]
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith(THIRD_PARTY_NOISE)]
    assert len(lines) == 1, stderr
    assert path in lines[0] and "Input/output error" in lines[0] and "3 retries" in lines[0]
    validate = tmp_path / "out" / "validate"
    assert not any(p.is_file() for p in validate.rglob("*")), sorted(validate.rglob("*"))  # no rejects, no parts
