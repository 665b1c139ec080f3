"""Filling a sharded model from a full state dict so that each rank reads only the rows it keeps.

FSDP2 shards every parameter along dim 0: a rank's local tensor is rows ``[offset, offset + n)`` of the full one.
``fill_model`` allocates the local tensors (``to_empty``, as the DCP start does) and copies into each one
``state[key][offset:offset + n]``, cast by the copy to the parameter's dtype. With the ``LazyRows`` of
``DocEVCheckpointer.open_checkpoint`` (``docev.models.docev._sliced``) only those rows are read from the files, so
a rank's host memory holds its shards plus one slice in flight, not the whole checkpoint twice (as read, and cast
to fp32 by torchtune's ``load_from_full_model_state_dict``: ~23 + 46 GB per rank for the 11.4B preview; numbers
in ``benchmarks/load_memory.py`` and docs/architecture.md "Loading"). A plain dict of tensors works the same (a
slice of a tensor is a view). Parameters kept whole on every rank (the frozen vision tower, ``ignored_params``)
are read whole.

NF4 weights (QLoRA) are quantised with statistics of the whole tensor, so a slice cannot be quantised on its
own: each is read whole, one at a time, and handed to torchtune's ``load_from_full_model_state_dict``, which
quantises and shards it (the whole-checkpoint peak is gone; one full tensor is the most held at once).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import training


class Rows(Protocol):
    """A full tensor that can be read by a row range: a ``torch.Tensor`` or a ``LazyRows``."""

    shape: torch.Size

    def __getitem__(self, rows: slice) -> torch.Tensor: ...


def local_rows(target: torch.Tensor) -> slice:
    """The rows of the full tensor that this rank's part of ``target`` holds (all of them for a plain tensor)."""
    if not isinstance(target, DTensor):
        return slice(None)
    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    if tuple(shape[1:]) != tuple(target.shape[1:]) or any(offset[1:]):
        raise ValueError(f"a shard of {tuple(shape)} at {tuple(offset)}: only dim-0 (FSDP) sharding is read by rows")
    return slice(offset[0], offset[0] + shape[0])


def fill_model(model: nn.Module, state: Mapping[str, Rows], device: torch.device) -> tuple[list[str], list[str]]:
    """Allocate ``model`` (built on the meta device, sharded or not) on ``device`` and copy each parameter's rows
    from ``state``; returns (missing keys, left allocated but unset; unexpected keys, not read)."""
    model.to_empty(device=device)
    held = model.state_dict()
    missing = [k for k in held if k not in state]
    unexpected = [k for k in state if k not in held]
    with torch.no_grad():
        for key, target in held.items():
            if key not in state:
                continue
            source = state[key]
            if tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{key}: the checkpoint holds {tuple(source.shape)}, the model {tuple(target.shape)}")
            local = target.to_local() if isinstance(target, DTensor) else target
            if isinstance(local, NF4Tensor):
                training.load_from_full_model_state_dict(model, {key: source[:]}, device, strict=False)
            else:
                local.copy_(source[local_rows(target)])
    return missing, unexpected
