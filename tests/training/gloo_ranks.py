"""Run a worker script on CPU ranks under real ``torchrun`` and read back what it saved.

The multi-rank tests (sharding, loading, memory, gradient dtype) all launch a worker the same way:
``--standalone`` (a free port, so concurrent torchrun jobs on the machine do not collide), one OMP thread
per rank, the worker's folder on ``PYTHONPATH`` for its sibling helpers, and ``torch.save`` of the results
to the last argument.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_ranks(worker: Path, nproc: int, *args: object, out: Path, timeout: float = 600) -> dict:
    """Launch ``worker`` on ``nproc`` gloo ranks with ``args`` and ``out``; return ``torch.load(out)``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(worker.parent), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(worker), *map(str, args), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(out, weights_only=True)
