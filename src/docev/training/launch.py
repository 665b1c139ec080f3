"""``docev train``: the recipe under ``torchrun`` with the configured number of processes.

On a workstation ``torchrun`` gets ``--nnodes``/``--nproc_per_node`` from ``train`` (one node: a
standalone rendezvous on a free port). Inside a PyTorchJob pod the Training Operator, inside a TrainJob pod
Trainer's torch plugin, sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and
``PET_MASTER_PORT``, which ``torchrun`` reads as the defaults of its options, so nothing is passed that would
override them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from docev.config import ConfigError, DocEVConfig

RECIPE_MODULE = "docev.training.recipe"


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
    argv = [sys.executable, "-m", "torch.distributed.run"]
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
