"""``docev train``: the recipe under ``torchrun`` with the configured number of processes.

On a workstation ``torchrun`` gets ``--nnodes``/``--nproc_per_node`` from ``train`` (one node: a
standalone rendezvous on a free port). Inside a PyTorchJob pod the Training Operator, inside a TrainJob pod
Trainer's torch plugin, sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``, which ``torchrun`` reads as the defaults of its options, so nothing is passed that would
override them.

torchrun runs inside this module (``python -m docev.training.launch <torchrun args>``) rather than as
``torch.distributed.run``, for one reason: its exit status. A torchrun that receives SIGTERM forwards it
to the workers (which save the step in flight and exit, see ``docev.training.preemption``), waits up to
``--shutdown-timeout`` (= ``train.termination_grace_seconds``) and then raises, which plain torchrun
turns into exit status 1, a permanent failure for the Training Operator. Here a signal ends the launcher
with ``128 + signal`` (143 for SIGTERM), which the operator restarts, as it does when every worker exited
with ``PREEMPTED_EXIT_CODE``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping, Sequence

from docev.config import ConfigError, DocEVConfig

RECIPE_MODULE = "docev.training.recipe"
LAUNCH_MODULE = "docev.training.launch"


def torchrun_argv(
    cfg: DocEVConfig, config_path: str, overrides: Sequence[str] = (), env: Mapping[str, str] = os.environ
) -> list[str]:
    """The command that trains ``cfg`` on this machine (``train.backend: local``)."""
    if cfg.train.backend != "local":
        job = {"kubernetes": "a PyTorchJob", "trainjob": "a Kubeflow Trainer TrainJob"}[cfg.train.backend]
        raise ConfigError(
            [
                f"train.backend: {cfg.train.backend!r} runs training as {job}, which the pipeline's train step "
                "creates (or `docev render-manifests` + kubectl apply); its pods run `docev train ... "
                "train.backend=local`. Pass train.backend=local to train on this machine."
            ]
        )
    argv = [sys.executable, "-m", LAUNCH_MODULE, "--shutdown-timeout", str(cfg.train.termination_grace_seconds)]
    if "PET_NNODES" not in env:
        if cfg.train.nnodes > 1:
            raise ConfigError(
                [
                    f"train.nnodes: {cfg.train.nnodes} nodes need a rendezvous; run inside the PyTorchJob or TrainJob "
                    "(which sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT) or set those variables "
                    "on every node"
                ]
            )
        argv += ["--standalone", "--nnodes", "1", "--nproc_per_node", str(cfg.train.nproc_per_node)]
    return [*argv, "-m", RECIPE_MODULE, "--config", config_path, *overrides]


def drop_unsupported_shutdown_timeout(args: Sequence[str], options: set[str]) -> tuple[list[str], str | None]:
    """``args`` without ``--shutdown-timeout N`` when this torchrun has no such option (``options``: its option
    strings; torch 2.11's torchrun waits a fixed 30 s after a forwarded signal), and the warning to print."""
    args = list(args)
    if "--shutdown-timeout" not in args or "--shutdown-timeout" in options:
        return args, None
    at = args.index("--shutdown-timeout")
    seconds = args[at + 1]
    del args[at : at + 2]
    return args, (
        f"docev train: this torchrun has no --shutdown-timeout; after a forwarded SIGTERM the workers get its fixed "
        f"grace period, not train.termination_grace_seconds = {seconds} s (torch >= 2.13 honours it)"
    )


def run_torchrun(args: Sequence[str]) -> int:
    """torchrun with ``args`` in this process; a signal it forwarded ends it with ``128 + signal``."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import main as torchrun

    from docev.training.preemption import PREEMPTED_EXIT_CODE  # imports torch: not before `docev train` execs

    args, warning = drop_unsupported_shutdown_timeout(args, set(get_args_parser()._option_string_actions))
    if warning:
        print(warning, file=sys.stderr)
    try:
        torchrun(list(args))
    except SignalException as exc:
        print(f"docev train: {exc.sigval.name} forwarded to the workers; exiting {128 + exc.sigval}", file=sys.stderr)
        return 128 + exc.sigval
    except ChildFailedError as exc:
        # Workers signalled directly: each saved and exited to be restarted, or was still exiting when
        # torchrun, seeing the first exit, sent it SIGTERM.
        codes = {f.exitcode for f in exc.failures.values()}
        if PREEMPTED_EXIT_CODE in codes and codes <= {PREEMPTED_EXIT_CODE, -signal.SIGTERM}:
            return PREEMPTED_EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
