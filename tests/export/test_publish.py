"""Publishing an export never destroys: only this project's exports are replaced, and a SIGKILL at any
rename or unlink of a publish leaves the destination a whole export (the next run cleans up)."""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, small_tmpfs, tiny_config

import docev.export.publish as publish_module
import docev.run.publish as run_publish
from docev.cli import main
from docev.export import ExportError, export_checkpoint, verify_checksums, write_checksums
from docev.export.publish import (
    MANIFEST,
    STAGING_MARK,
    destination_lock,
    new_staging,
    recover,
    replace_export,
)

from .conftest import sources_list

_EVENTS = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "ctypes.call_function"}


def _export_run(dest: Path, label: str) -> None:
    """One export run to ``dest`` as export_checkpoint does it: lock, recover, stage, seal, sum, publish."""
    with destination_lock(dest):
        recover(dest)
        staging = new_staging(dest)
        (staging / "config.json").write_text(json.dumps({"label": label}))
        (staging / "model.safetensors").write_bytes(label.encode() * 1000)
        (staging / "adapter").mkdir()
        (staging / "adapter" / "adapter_config.json").write_text(label)
        publish_module.seal(staging, {"label": label})
        write_checksums(staging)
        replace_export(staging, dest)


def _run_killed_at(dest: Path, kill_at: int, can_exchange: bool) -> int:
    """``_export_run`` in a forked process that SIGKILLs itself just before its ``kill_at``-th rename, unlink,
    rmdir, mkdir or renameat2. Returns the wait status; a run that finishes exits with its event count."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 255
        try:
            if not can_exchange:
                run_publish._renameat2 = None
            seen = [0]

            def hook(event, _args):
                if event in _EVENTS:
                    if seen[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    seen[0] += 1

            sys.addaudithook(hook)
            _export_run(dest, "new")
            code = seen[0]
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _label(dest: Path) -> str:
    verify_checksums(dest)
    return json.loads((dest / "config.json").read_text())["label"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("can_exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_sigkill_at_every_step_leaves_a_whole_export(tmp_path, can_exchange):
    if can_exchange and run_publish._renameat2 is None:
        pytest.skip("libc has no renameat2: the exchange path did not run")
    dest = tmp_path / "out" / "export"
    dest.parent.mkdir()
    _export_run(dest, "old")
    status = _run_killed_at(dest, 10**6, can_exchange)
    assert os.WIFEXITED(status) and _label(dest) == "new"
    events = os.WEXITSTATUS(status)
    assert events >= 8  # mkdir, the marks, the swap, the old export's files and folders, the lock
    missing = []
    for kill_at in range(events):
        shutil.rmtree(dest.parent)
        dest.parent.mkdir()
        _export_run(dest, "old")
        status = _run_killed_at(dest, kill_at, can_exchange)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, kill_at
        if dest.exists():
            assert _label(dest) in ("old", "new"), kill_at  # whole and verifying, old or new
        else:
            missing.append(kill_at)
        with destination_lock(dest):  # the next run's first step
            assert recover(dest) == []
        assert _label(dest) in ("old", "new") and os.listdir(dest.parent) == ["export"], kill_at
        assert not (dest / STAGING_MARK).exists() and (dest / MANIFEST).is_file()
    # The exchange never leaves the destination missing; renaming aside has one window, which recover closes.
    assert len(missing) == (0 if can_exchange else 1), missing


def test_recover_keeps_what_it_cannot_prove_ours(tmp_path):
    dest = tmp_path / "export"
    _export_run(dest, "old")
    strangers = [tmp_path / ".export.partial-mine", tmp_path / ".export.old-notes"]
    for folder in strangers:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    ours = new_staging(dest)  # a build killed midway
    (ours / "model.safetensors").write_bytes(b"half")
    empty = tmp_path / ".export.old-empty"
    empty.mkdir()
    with destination_lock(dest):
        kept = recover(dest)
    assert [line.split(":")[0] for line in kept] == [str(strangers[1]), str(strangers[0])]
    assert not ours.exists() and not empty.exists() and all((f / "notes.txt").is_file() for f in strangers)


def test_a_second_export_to_a_locked_destination_is_refused(tmp_path):
    dest = tmp_path / "export"
    with destination_lock(dest), pytest.raises(publish_module.DestinationRefused, match="another export to"):
        _export_run(dest, "new")
    assert os.listdir(tmp_path) == []


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_at_a_folder_that_is_no_export_refuses_and_deletes_nothing(export_run, tiny_checkpoint, synth_sources,
                                                                       tmp_path, capsys):  # fmt: skip
    cfg = tiny_config(export_run, tiny_checkpoint, sources_list(synth_sources), "export.overwrite=true")
    before = _tree(export_run)
    with pytest.raises(ExportError, match=rf"{export_run} holds no export written by docev .*nothing was deleted"):
        export_checkpoint(cfg, "latest", str(export_run), overwrite=True)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("keep me")
    overrides = [f"output_dir={export_run}", f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
                 f"datasets={json.dumps(sources_list(synth_sources))}"]  # fmt: skip
    args = ["export", "--config", str(CONFIGS / "tiny.yaml"), "--overwrite", "--out", str(notes), *overrides]
    assert main(args) == 1
    assert f"{notes} holds no export written by docev" in capsys.readouterr().err
    assert _tree(export_run) == before and _tree(notes) == {"todo.md": b"keep me"}


def test_an_export_with_a_users_file_is_not_replaced(tmp_path):
    dest = tmp_path / "export"
    _export_run(dest, "old")
    (dest / "my_eval.txt").write_text("results")
    with pytest.raises(publish_module.DestinationRefused, match=r"holds files docev did not write: my_eval.txt"):
        publish_module.check_replaceable(publish_module.fsspec.filesystem("file"), str(dest), str(dest))


def test_a_full_disk_is_named_and_leaves_nothing(export_run, tiny_checkpoint, synth_sources, tmp_path):
    """The export's folder on a 1 MB tmpfs (the tiny weights are ~3 MB): the error names the staging folder, the
    bytes needed and free, instead of a safetensors traceback; no staging folder or lock is left behind."""
    with small_tmpfs(tmp_path / "small", "1m") as mnt:
        cfg = tiny_config(export_run, tiny_checkpoint, sources_list(synth_sources))
        with pytest.raises(ExportError, match=rf"writing {mnt}/\.export\.partial-\w+: no space left: it needs "
                                              r"~[\d,]+ bytes .*, [\d,]+ bytes .* free; free space or choose another "
                                              r"--out"):  # fmt: skip
            export_checkpoint(cfg, "latest", str(mnt / "export"))
        assert os.listdir(mnt) == []
