"""validate → preprocess → train on UFX sources in S3 (moto's server on 127.0.0.1, read through s3fs),
against the same data on local disk; a fault-injecting proxy in front of the store; escapes; secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
from conftest import CONFIGS, tiny_config
from s3_server import ACCESS_KEY, CREDENTIAL_ENV, SECRET_KEY, FaultProxy, MotoS3, upload

from docev.data.preprocess import run_preprocess, shards_dir
from docev.storage import TransientStorageError
from docev.validate.runner import run_validate, validate_dir

BUCKET = "corpus"


@pytest.fixture(scope="module")
def s3(synth_sources):
    saved = {k: os.environ.get(k) for k in CREDENTIAL_ENV}
    os.environ.update(CREDENTIAL_ENV)
    server = MotoS3()
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    fs.mkdir(BUCKET)
    for name, folder in synth_sources.items():
        upload(fs, folder, f"s3://{BUCKET}/ufx/{name}")
    fs.pipe_file(
        f"{BUCKET}/ufx-private/secret.png", (synth_sources["instruct"] / "images" / "000000_0.png").read_bytes()
    )
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _datasets(root: str, endpoint: str | None = None, **options) -> list[dict]:
    opts = {"storage_options": {"endpoint_url": endpoint, **options}} if endpoint else {}
    return [
        {"source": f"{root}/instruct", "name": "instruct", **opts},
        {"source": f"{root}/pretrain", "name": "pretrain", "ufx_type": "pretrain", "context_col": "text", **opts},
    ]


def _run(tmp: Path, ckpt: Path, datasets: list[dict]):
    cfg = tiny_config(tmp, ckpt, datasets, "preprocess.records_per_shard=6")
    report = run_validate(cfg, workers=1)
    return cfg, report, run_preprocess(cfg, workers=1)


def _shard_bytes(cfg) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shards_dir(cfg).glob("shard-*.arrow"))}


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_checkpoint, synth_sources, s3):
    local_root = str(synth_sources["instruct"].parent)
    local = _run(tmp_path_factory.mktemp("local"), tiny_checkpoint, _datasets(local_root))
    remote = _run(tmp_path_factory.mktemp("s3"), tiny_checkpoint, _datasets(f"s3://{BUCKET}/ufx", s3.endpoint))
    return local, remote


def _counts(report: dict) -> dict:
    return {n: {k: s[k] for k in ("read", "accepted", "rejected", "reasons")} for n, s in report["sources"].items()}


def test_s3_source_gives_the_counts_and_shards_of_local_disk(both):
    (lcfg, lrep, lman), (rcfg, rrep, rman) = both
    assert _counts(rrep) == _counts(lrep) and rrep["sources"]["instruct"]["read"] == 20
    assert (validate_dir(rcfg) / "manifest.jsonl").read_text() == (validate_dir(lcfg) / "manifest.jsonl").read_text()
    assert rman["total_samples"] == lman["total_samples"] == 25
    assert rman["bytes_original_images"] == lman["bytes_original_images"] > 0
    local, remote = _shard_bytes(lcfg), _shard_bytes(rcfg)
    assert len(remote) == 5 and remote == local  # byte-identical shards


def test_training_runs_on_shards_of_an_s3_source(both, tiny_checkpoint, s3):
    _, (cfg, _, _) = both
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={cfg.output_dir}",
            f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
            f"datasets={json.dumps(_datasets(f's3://{BUCKET}/ufx', s3.endpoint))}", "epochs=1",
            "max_steps_per_epoch=2", "save_every_n_steps=100", "preprocess.records_per_shard=6"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "docev.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (Path(cfg.output_dir) / "logs" / "metrics.jsonl").open()]
    assert steps[-1] == 2


def test_no_credential_in_any_output_file_or_the_compiled_pipeline(both, tmp_path):
    from pipelines.compile import compile_pipeline

    _, (cfg, _, _) = both
    out = compile_pipeline(
        CONFIGS / "docev_preview.yaml",
        tmp_path / "p.yaml",
        [f"datasets={json.dumps(_datasets(f's3://{BUCKET}/ufx', 'http://minio.storage:9000'))}",
         "kubernetes.storage_secret=docev-s3"],
    )  # fmt: skip
    text = out.read_text()
    assert "docev-s3" in text and "AWS_SECRET_ACCESS_KEY" in text  # referenced by name, as env
    files = [p for p in Path(cfg.output_dir).rglob("*") if p.is_file()] + [out]
    assert len(files) > 10
    for path in files:
        blob = path.read_bytes()
        assert ACCESS_KEY.encode() not in blob and SECRET_KEY.encode() not in blob, path


def test_faults_are_retried_counted_and_lose_nothing(both, tmp_path, tiny_checkpoint, s3):
    _, (rcfg, rrep, rman) = both
    proxy = FaultProxy(s3.endpoint, every=3)
    try:
        datasets = _datasets(f"s3://{BUCKET}/ufx", proxy.endpoint, backoff_seconds=0.01)
        cfg = tiny_config(tmp_path, tiny_checkpoint, datasets, "preprocess.records_per_shard=6")
        report = run_validate(cfg, workers=1)
        validate_faults = dict(proxy.faults)
        manifest = run_preprocess(cfg, workers=1)
    finally:
        proxy.stop()
    assert validate_faults["503"] > 3 and validate_faults["drop"] > 3
    # the report counts the retries of the record reads (listing and thumbnails retry too, uncounted; a dropped
    # keep-alive connection may also be re-sent by aiohttp itself): some, never more than the faults
    retries = sum(s["retries"] for s in report["sources"].values())
    assert 0 < retries <= sum(validate_faults.values())
    assert 0 < manifest["storage_retries"] <= sum(proxy.faults.values()) - sum(validate_faults.values())
    assert _counts(report) == _counts(rrep) and manifest["total_samples"] == rman["total_samples"]
    assert (validate_dir(cfg) / "manifest.jsonl").read_text() == (validate_dir(rcfg) / "manifest.jsonl").read_text()
    assert _shard_bytes(cfg) == _shard_bytes(rcfg)
    md = (validate_dir(cfg) / "report.md").read_text()
    assert all(f"- {n}: retries {s['retries']}" in md for n, s in report["sources"].items())


def test_a_fault_that_outlasts_the_retries_fails_the_task(tmp_path, tiny_checkpoint, s3):
    proxy = FaultProxy(s3.endpoint, every=1)  # every GET fails
    try:
        datasets = _datasets(f"s3://{BUCKET}/ufx", proxy.endpoint, backoff_seconds=0.0, retries=2)
        cfg = tiny_config(tmp_path, tiny_checkpoint, datasets)
        with pytest.raises(TransientStorageError, match="still failing after 2 retries"):
            run_validate(cfg, workers=1)
    finally:
        proxy.stop()
    assert not (validate_dir(cfg) / "rejects.jsonl").exists()  # never turned into rejects


def test_images_escaping_the_source_prefix_are_rejected_with_the_reason(tmp_path, tiny_checkpoint, s3):
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    record = {"context": [{"role": "user", "content": "<image> What?"}, {"role": "assistant", "content": "A."}]}
    names = ["../../ufx-private/secret.png", "s3://corpus/ufx-private/secret.png", "s3://other/x.png",
             "images/nowhere.png"]  # fmt: skip
    lines = [json.dumps({"id": f"r{i}", **record, "image_files": [n]}) for i, n in enumerate(names)]
    fs.pipe_file(f"{BUCKET}/esc/src/data.jsonl", ("\n".join(lines) + "\n").encode())
    datasets = [{"source": f"s3://{BUCKET}/esc/src", "name": "esc", "storage_options": {"endpoint_url": s3.endpoint}}]
    cfg = tiny_config(tmp_path, tiny_checkpoint, datasets, "validate.max_reject_fraction=1.0")
    run_validate(cfg, workers=1)
    rejects = [json.loads(line) for line in (validate_dir(cfg) / "rejects.jsonl").open()]
    assert [r["reason"] for r in rejects] == ["path_escape"] * 3 + ["image_missing"]
    assert "s3://corpus/ufx-private/secret.png, outside the source root s3://corpus/esc/src" in rejects[0]["detail"]
    assert "outside the allowed roots" in rejects[1]["detail"] and rejects[1]["field"] == "image_files.0"
    # the other prefix becomes readable once it is an allowed root
    allowed = tiny_config(tmp_path / "allowed", tiny_checkpoint, datasets, "validate.max_reject_fraction=1.0",
                          'validate.allowed_roots=["s3://corpus/ufx-private"]')  # fmt: skip
    run_validate(allowed, workers=1)
    rejects = [json.loads(line)["reason"] for line in (validate_dir(allowed) / "rejects.jsonl").open()]
    assert rejects == ["path_escape", "image_missing"]


def test_export_smoke_image_is_read_from_the_source_store(both):
    from docev.export.export import _smoke_image, pick_smoke_sample

    (lcfg, _, _), (rcfg, _, _) = both
    local, remote = pick_smoke_sample(lcfg), pick_smoke_sample(rcfg)
    assert str(remote.image).startswith(f"s3://{BUCKET}/ufx/") and remote.id == local.id
    assert _smoke_image(rcfg, remote).tobytes() == _smoke_image(lcfg, local).tobytes()
