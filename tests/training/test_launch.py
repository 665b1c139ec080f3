import sys

import pytest
from conftest import CONFIGS, tiny_config

from docev.config import ConfigError
from docev.training.launch import torchrun_argv


def test_torchrun_argv_local_and_in_a_pytorchjob(tmp_path, tiny_checkpoint):
    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    path = str(CONFIGS / "tiny.yaml")
    local = torchrun_argv(cfg, path, ["epochs=2"], env={})
    launcher = [sys.executable, "-m", "docev.training.launch", "--shutdown-timeout", "600"]
    assert local == [*launcher, "--standalone", "--nnodes", "1",
                     "--nproc_per_node", "2", "-m", "docev.training.recipe", "--config", path, "epochs=2"]  # fmt: skip
    # In a PyTorchJob pod torchrun reads PET_NNODES, PET_NPROC_PER_NODE, PET_MASTER_ADDR... itself.
    pod = torchrun_argv(cfg, path, [], env={"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"})
    assert pod == [*launcher, "-m", "docev.training.recipe", "--config", path]


def test_torchrun_argv_refuses_what_it_cannot_start(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="train.nnodes: 2 nodes need a rendezvous"):
        torchrun_argv(
            tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], "train.nnodes=2"), "c.yaml", env={}
        )
    with pytest.raises(ConfigError, match="train.backend: 'kubernetes' runs training as a PyTorchJob"):
        torchrun_argv(
            tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], "train.backend=kubernetes"),
            "c.yaml",
            env={},
        )
    with pytest.raises(ConfigError, match="train.backend: 'trainjob' runs training as a Kubeflow Trainer TrainJob"):
        torchrun_argv(
            tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], "train.backend=trainjob"),
            "c.yaml",
            env={},
        )


def test_a_torchrun_without_shutdown_timeout_gets_the_args_it_knows():
    """torch 2.11's torchrun (the lent GPU machine's) has no --shutdown-timeout: the launcher drops it, says so."""
    from torch.distributed.run import get_args_parser

    from docev.training.launch import drop_unsupported_shutdown_timeout

    args = ["--shutdown-timeout", "600", "--standalone", "-m", "docev.training.recipe", "--config", "c.yaml"]
    kept, warning = drop_unsupported_shutdown_timeout(args, {"--standalone", "--nnodes"})
    assert kept == args[2:] and "train.termination_grace_seconds = 600 s" in warning
    here = set(get_args_parser()._option_string_actions)
    assert drop_unsupported_shutdown_timeout(args, here) == ((args, None) if "--shutdown-timeout" in here
                                                             else (args[2:], warning))  # fmt: skip
