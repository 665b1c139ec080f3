"""Preemption: on SIGTERM finish the step in flight, checkpoint it, exit with a code the operator retries.

Kubernetes evicts a pod (node drain, spot reclaim, a higher-priority job) by sending SIGTERM to the
container's first process and SIGKILL ``terminationGracePeriodSeconds`` later. ``docev train`` runs
torchrun in that process; torchrun forwards the signal to every worker and waits up to its
``--shutdown-timeout`` (set to ``train.termination_grace_seconds``) before killing them.

In each worker the first SIGTERM only sets a flag: the optimizer step in flight completes. At every step
boundary the ranks all-reduce the flag (one int32 MAX; cheap next to the step's own collectives), so they
agree on the same step even when the signal reached them at different moments; then the recipe saves
that step (``latest`` moves last) and every rank exits with ``PREEMPTED_EXIT_CODE``.

A second signal kills the process at once (the default action). So does torchrun or the kubelet when
the grace runs out. The checkpointer writes ``step_N`` under a temporary name and moves ``latest`` last,
so either way the previous ``latest`` stays loadable and the restart resumes from it.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

# 128 + SIGTERM, what a shell reports for a process ended by SIGTERM. The Training Operator's ExitCode
# restart policy treats 128-255 as retryable (1-127 are permanent errors) and OnFailure restarts on
# any non-zero code, so the job comes back under either policy; 0 would end it as Succeeded.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):  # noqa: N818 - an outcome, not an error
    """Raised by the train loop once the preemption checkpoint is saved; the recipe exits with the code."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved step {step}, exiting with {PREEMPTED_EXIT_CODE} to be restarted")
        self.step = step


class PreemptionHandler:
    """Turns SIGTERM into a flag the ranks agree on at step boundaries.

    Args:
        device (torch.device): where the flag tensor lives (the process group's device).
        signals (tuple[signal.Signals, ...]): the signals that request a checkpoint-and-exit.
    """

    def __init__(self, device: torch.device, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self._device = device
        self._signals = signals
        self._previous: dict[signal.Signals, Any] = {}
        self.requested = False

    def install(self) -> None:
        """Take over the signals (main thread only, as Python requires)."""
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second signal: stop now; the previous `latest` is intact
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        # os.write, not logging: a handler may run while the logging lock is held
        rank, name = os.environ.get("RANK", "0"), signal.Signals(signum).name
        os.write(sys.stderr.fileno(), f"[rank{rank}]: got {name}: finishing the step, then saving\n".encode())

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a collective: every rank calls it each step)."""
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=self._device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
