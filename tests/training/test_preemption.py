"""The preemption handler and the launcher's exit status, with real signals and a real torchrun
(the whole path through the recipe is in test_recipe.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from docev.training.preemption import PREEMPTED_EXIT_CODE

_HANDLER = """
import os, signal, socket, sys
import torch, torch.distributed as dist
from docev.training.preemption import PreemptionHandler
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
handler = PreemptionHandler(torch.device("cpu"))
handler.install()
print("before", handler.agreed(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("after one", handler.agreed(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("after two: still alive", flush=True)
"""


def test_first_sigterm_sets_the_flag_the_second_kills():
    proc = subprocess.run([sys.executable, "-c", _HANDLER], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["before False", "after one True"], proc.stderr[-2000:]
    assert "[rank0]: got SIGTERM: finishing the step, then saving" in proc.stderr
    assert proc.returncode == -signal.SIGTERM  # died of the second signal, no save attempted


_WORKER = """
import signal, sys, time
mode = sys.argv[1]
if mode == "preempted":  # what the recipe does after its preemption checkpoint
    sys.exit({code})
if mode == "fails":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit({code}))  # "save", then exit to be restarted
print("ready", flush=True)
time.sleep(120)
"""


def _launch(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(code=PREEMPTED_EXIT_CODE))
    cmd = [sys.executable, "-m", "docev.training.launch", "--shutdown-timeout", "60", "--standalone",
           "--nnodes", "1", "--nproc_per_node", "2", str(script), mode]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_launcher_exits_retryable_when_signalled(tmp_path):
    """torchrun alone would exit 1 (a permanent failure for the operator's ExitCode policy)."""
    proc = _launch(tmp_path, "wait")
    try:
        ready = 0
        deadline = time.monotonic() + 120
        while ready < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            ready += line.count("ready")  # the two ranks' lines can interleave on one line
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    assert "SIGTERM forwarded to the workers; exiting 143" in log


def test_launcher_exit_status_from_the_workers(tmp_path):
    preempted = _launch(tmp_path, "preempted")
    log, _ = preempted.communicate(timeout=120)
    assert preempted.returncode == PREEMPTED_EXIT_CODE, log[-3000:]
    failed = _launch(tmp_path, "fails")
    log, _ = failed.communicate(timeout=120)
    assert failed.returncode == 1 and "ChildFailedError" in log  # any other failure: torchrun's own status
