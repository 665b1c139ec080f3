"""``bash benchmarks/gpu_check.sh --dry-run``: every stage of the GPU check on CPU at toy size, with the packages
the GPU machine lacks and the check must not need made unimportable, before lent GPU minutes are spent on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # ~1 min of CPU (validate, preprocess, 3 training steps, the kernel stages)


def test_dry_run_passes_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "3", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert all(summary[s]["ok"] for s in ("preflight", "train", "layers", "host_syncs", "mfu")), summary
    assert summary["preflight"]["missing_torch_apis"] == [] and summary["train"]["steps"] == 3
    assert summary["train"]["checkpoint_save_seconds"] is not None
    assert not (tmp_path / "work" / "run" / "checkpoints").exists()  # timed, then deleted
    assert summary["host_syncs"]["micro_batch"] == {}
    assert summary["mfu"]["titan_llama8b_flops_per_token"] == pytest.approx(57.9e9, rel=1e-3)
    assert (tmp_path / "out" / "trace.json.gz").stat().st_size > 0
    assert "[gpu_check +" in proc.stdout  # it prints as it goes
