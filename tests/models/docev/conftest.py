"""Fixtures for the DocEV model tests: the tiny checkpoint's HF tensors and a model loaded from it."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from docev.models.docev import DocEVCheckpointer, docev_tiny, tiny
from docev.vision.geometry import num_image_tokens, plan_tiles

ARCH = tiny()


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


def _make_batch(rows, ratio, seed=0, text=5):
    """rows: per batch row, the (h, w) of its images. Text, then each image's slots followed by text."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [s for row in rows for s in row]
    grids = [plan_tiles(h, w, ARCH.tile_size, ARCH.min_num_tiles, ARCH.max_num_tiles).grid for h, w in sizes]
    seqs = []
    for row in rows:
        seq = torch.randint(0, ARCH.vocab_size, (text,), generator=gen).tolist()
        for h, w in row:
            n = num_image_tokens(h, w, ratio, tile_size=ARCH.tile_size, patch_size=ARCH.patch_size)
            seq += [ARCH.image_token_id] * n
            seq += torch.randint(0, ARCH.vocab_size, (text,), generator=gen).tolist()
        seqs.append(seq)
    length = max(map(len, seqs))
    tokens = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    max_tiles = max(1 + r * c for r, c in grids)
    return {
        "tokens": tokens,
        "pixel_values": torch.randn(len(sizes), max_tiles, 3, ARCH.tile_size, ARCH.tile_size, generator=gen),
        "image_sizes": torch.tensor(sizes),
        "image_grids": torch.tensor(grids),
        "sampling_ratio": ratio,
    }


@pytest.fixture
def make_batch():
    """A batch in the collate's model-input contract (docs/architecture.md, "Model inputs")."""
    return _make_batch
