"""Fixtures for the DocEV model tests: the tiny checkpoint's HF tensors and a model loaded from it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from docev.models.docev import DocEVCheckpointer, docev_tiny


@pytest.fixture(scope="session")
def hf_tensors(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """Read with safetensors directly, independent of the checkpointer under test."""
    out = {}
    for f in sorted(tiny_checkpoint.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def tune_state(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    return DocEVCheckpointer(tiny_checkpoint).load_checkpoint()["model"]


@pytest.fixture
def tiny_model(tune_state):
    torch.manual_seed(0)
    model = docev_tiny()
    model.load_state_dict(tune_state, strict=True)
    return model.eval()
