"""Turning a model built on the meta device into real tensors without a checkpoint.

Benchmarks and tests measure memory, communication and kernels on a model of the real shape with random
weights; this is the one place that does it, so each measures the same kind of model. RoPE caches are
non-persistent buffers: neither ``to_empty`` nor a state dict fills them, so every materialization (and every
load of a state dict into a meta model) rebuilds them with ``init_rope``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def init_rope(
    model: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> None:
    """Rebuild every RoPE cache (``rope_init``), made on ``device`` in ``dtype`` (default: the current ones):
    the caches are not in the state dict, so a model filled from one or by ``to_empty`` lacks them."""
    with _default_dtype(dtype), torch.device(device) if device is not None else contextlib.nullcontext():
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()


def materialize(model: torch.nn.Module, device: torch.device | str, *, std: float = 0.02) -> torch.nn.Module:
    """Allocate a meta-device (possibly FSDP-sharded) model on ``device``, draw every parameter from
    N(0, ``std``) (each rank its own shard) and build the RoPE caches; returns the model."""
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            (p.to_local() if isinstance(p, DTensor) else p).normal_(std=std)
    init_rope(model, device)
    return model
