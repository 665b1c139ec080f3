"""FSDP2 layout of DocEV: the device mesh, the unit plan, and when gradients are reduced.

Why each choice (numbers: ``benchmarks/comm_volume.py``, docs/architecture.md "Sharding"):

- **Mesh.** ``full`` shards every parameter over all ranks (one mesh dim ``shard``); ``hybrid`` shards within a
  node and replicates across nodes (mesh ``(replicate, shard)`` = ``(nodes, ranks per node)``): all-gathers and
  reduce-scatters stay on the node's NVLink, only one all-reduce of the gradient shards crosses nodes.
  ``auto`` (the default) is hybrid when ``train.nnodes > 1``.
- **Frozen vision tower replicated, not sharded.** With ``encoder_trainable: false`` its parameters are
  ``ignored_params`` of FSDP, cast to the compute dtype and kept whole on every rank: no all-gather per
  micro-batch, no reduce-scatter (it has no gradient), and a rank whose micro-batch has no image may skip it
  without any collective to mismatch. Cost: the tower in bf16 on every rank (0.83 GB at preview size) instead
  of 1/N of it. A trainable tower stays in the root unit, sharded and trained as before.
- **Units.** Each decoder layer and the token embedding (every rank calls them once per micro-batch), and the
  output projection, which projects every loss chunk in one call (``ChunkedOutputProjection``, models/docev/
  _layers.py; called once per chunk, as torchtune does, FSDP would reduce-scatter and re-gather it per
  chunk); it and the root are
  not resharded between forward and backward (backward starts with them). The root holds the rest (final
  norm, connector, ``image_newline``; a trainable tower): a rank whose micro-batch has no image skips the
  vision path, so it cannot be a unit of its own.
- **Gradient reduction** (``train.gradient_reduction``): ``every_micro_batch`` reduces each micro-batch;
  ``last_micro_batch_across_nodes`` (hybrid) reduce-scatters within the node every micro-batch and all-reduces
  across nodes only on the step's last one (no extra memory; on one node it is ``every_micro_batch``);
  ``last_micro_batch`` skips every reduction until the last micro-batch (``set_requires_gradient_sync``): each
  rank then holds the unsharded gradients of every trainable parameter between micro-batches (2 bytes ×
  trainable parameters in bf16: ~22 GB at preview size, instead of 1/N of it).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

FsdpStrategy = Literal["auto", "full", "hybrid"]
GradientReduction = Literal["every_micro_batch", "last_micro_batch", "last_micro_batch_across_nodes"]


def resolve_strategy(strategy: FsdpStrategy, nnodes: int) -> Literal["full", "hybrid"]:
    """``auto``: hybrid across several nodes, full sharding on one."""
    if strategy == "auto":
        return "hybrid" if nnodes > 1 else "full"
    return strategy


def build_mesh(
    strategy: Literal["full", "hybrid"], *, world_size: int, ranks_per_node: int, device_type: str
) -> DeviceMesh:
    """1-D ``(shard,)`` for full sharding; 2-D ``(replicate, shard)`` = (nodes, ranks per node) for hybrid."""
    if strategy == "full":
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if world_size % ranks_per_node:
        raise ValueError(
            f"train.fsdp_strategy: hybrid needs whole nodes, but {world_size} ranks are not a multiple of "
            f"train.nproc_per_node = {ranks_per_node}"
        )
    return init_device_mesh(
        device_type, (world_size // ranks_per_node, ranks_per_node), mesh_dim_names=("replicate", "shard")
    )


def frozen_tower(model: nn.Module) -> list[nn.Parameter]:
    """The vision tower's parameters when none of them trains (they are replicated, not sharded)."""
    params = list(model.encoder.parameters())
    return [] if any(p.requires_grad for p in params) else params


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Shard a DocEV model (on the meta device or not) in place with the unit plan of the module docstring.

    Args:
        model (nn.Module): a ``DocEVModel``.
        mesh (DeviceMesh): from ``build_mesh``.
        mp_policy (MixedPrecisionPolicy | None): FSDP2 mixed precision for every unit.
        compute_dtype (torch.dtype | None): dtype of the replicated frozen tower (default: the policy's
            ``param_dtype``, else unchanged); it never trains, so it needs no fp32 master copy.
    """
    kwargs = {"mesh": mesh} if mp_policy is None else {"mesh": mesh, "mp_policy": mp_policy}
    frozen = frozen_tower(model)
    dtype = compute_dtype or (mp_policy.param_dtype if mp_policy is not None else None)
    if frozen and dtype is not None:
        model.encoder.to(dtype)
    for layer in model.decoder.layers:
        fully_shard(layer, reshard_after_forward=True, **kwargs)
    fully_shard(model.tok_embeddings, reshard_after_forward=True, **kwargs)
    fully_shard(model.decoder.output, reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=False, ignored_params=set(frozen) or None, **kwargs)
    model.set_reduce_scatter_unused_params(True)  # image-less ranks reduce zeros for the connector


def sync_gradients(model: FSDPModule, mode: GradientReduction, *, last: bool, hybrid: bool) -> None:
    """Before each micro-batch's forward: whether its backward reduces gradients (``last``: the step's last)."""
    if mode == "last_micro_batch":
        model.set_requires_gradient_sync(last)
    elif mode == "last_micro_batch_across_nodes" and hybrid:  # one node, full sharding: nothing crosses nodes
        model.set_requires_all_reduce(last)
