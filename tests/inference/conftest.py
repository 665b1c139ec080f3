"""A "trained" model folder for the generation tests: the tiny checkpoint with perturbed weights."""

from pathlib import Path

import pytest
from conftest import perturb

from docev.models.docev import DocEVCheckpointer


@pytest.fixture(scope="session")
def step_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("trained")
    ckpt = DocEVCheckpointer(tiny_checkpoint, output_dir=out)
    state = perturb(ckpt.load_checkpoint()["model"])
    ckpt.save_checkpoint({"model": state, "steps_run": 8, "optimizer": {"state": {}, "param_groups": []}}, step=8)
    return out / "step_8"
