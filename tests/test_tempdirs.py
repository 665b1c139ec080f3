"""docev.tempdirs: unique working folders per run; a killed run's folder is removed by the next run once its lock
proves it stale, a live run's never; a racing rename replaces the other run's folder instead of failing."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

from conftest import CONFIGS, ROOT, tiny_config

from docev.tempdirs import owned_tempdir, swap_in, sweep_stale


def test_unique_per_run_and_removed_after(tmp_path):
    with owned_tempdir(tmp_path, ".work.") as a, owned_tempdir(tmp_path, ".work.") as b:
        assert a != b and a.is_dir() and b.is_dir()
        (a / "f").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_stale_folders_are_swept_live_ones_kept(tmp_path):
    killed = tmp_path / ".work.old"  # what a kill -9 before this module existed left: no lock
    killed.mkdir()
    (killed / "half.jsonl").write_text("{")
    dead = tmp_path / ".work.dead"  # a lock file nobody holds: its owner died
    dead.mkdir()
    (tmp_path / ".work.dead.lock").touch()
    live = tmp_path / ".work.live"  # a lock held by a running process (here: an open file description)
    live.mkdir()
    fd = os.open(tmp_path / ".work.live.lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    mine = tmp_path / "work"  # the final folder and other names are never touched
    mine.mkdir()
    try:
        assert sweep_stale(tmp_path, ".work.") == [dead, killed]
        assert live.is_dir() and mine.is_dir() and not killed.exists() and not dead.exists()
    finally:
        os.close(fd)
    assert sweep_stale(tmp_path, ".work.") == [live]


def test_swap_in_replaces_a_folder_another_run_put_there(tmp_path):
    final = tmp_path / "part"
    final.mkdir()
    (final / "old").write_text("other run")
    with owned_tempdir(tmp_path, ".part.") as tmp:
        (tmp / "new").write_text("this run")
        swap_in(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]


def test_a_killed_runs_part_folder_is_removed_by_the_next_run(tmp_path, tiny_checkpoint, synth_sources):
    from docev.validate.runner import run_shard

    cfg = tiny_config(tmp_path / "out", tiny_checkpoint, [{"source": str(synth_sources["instruct"]), "name": "s"}])
    parts = tmp_path / "out" / "validate" / "parts"
    leftover = parts / ".00000-of-00001.k9x2ab"  # the name a run killed mid-shard left before this change
    leftover.mkdir(parents=True)
    (leftover / "accepted.jsonl").write_text('{"half": ')
    run_shard(cfg, 0, 1, workers=1)
    assert sorted(p.name for p in parts.iterdir()) == ["00000-of-00001"]


def test_two_validates_racing_on_one_output_dir_both_finish(tmp_path, tiny_checkpoint, synth_sources):
    out = tmp_path / "out"
    datasets = json.dumps([{"source": str(synth_sources["instruct"]), "name": "s"}])
    cmd = [sys.executable, "-m", "docev.cli", "validate", "--config", str(CONFIGS / "tiny.yaml"), f"output_dir={out}",
           f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null", f"datasets={datasets}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], results
    manifest = [json.loads(line) for line in (out / "validate" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 20 and len({e["id"] for e in manifest}) == 20
    left = [p.name for p in (out / "validate").rglob(".*")]
    assert left == [], left  # no temp folder or lock of either run is left
