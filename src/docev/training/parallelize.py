"""How the recipe's model is built, compiled, activation-checkpointed, sharded and filled (torchtitan's
``parallelize`` step, kept apart from the train loop).

``setup_model`` is the whole sequence; its parts are public so benchmarks and tests reuse them:
``build_model`` → ``parallelize_model`` (compile, activation checkpointing, ``apply_fsdp`` on a mesh from
``build_mesh``) → ``load_model_state``; the recipe calls ``sync_gradients`` before each micro-batch.

**Precision.** Parameters live in ``master_dtype``; compute runs in ``dtype``. With ``master_dtype: fp32``
and ``dtype: bf16`` FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` all-gathers
bf16 copies for forward/backward, reduce-scatters gradients in fp32 and accumulates them into the fp32
sharded gradients across micro-batches; AdamW's moments follow the fp32 parameters. ``master_dtype: bf16``
keeps everything in bf16 (torchtune's default): an update smaller than half a bf16 ulp of its weight is
rounded away, which at lr 1e-5 is most of them (``precision_warning``). Frozen groups are held in the
master dtype too: loading a bf16 or fp32 base into fp32 is exact, so their bits stay the base's.

**Sharding layout** (numbers: ``benchmarks/comm_volume.py``, docs/architecture.md "Sharding"); this module
is the only place that decides it:

- **Mesh** (``train.fsdp_strategy``). ``full`` shards every parameter over all ranks (one mesh dim ``shard``);
  ``hybrid`` shards within a node and replicates across nodes (mesh ``(replicate, shard)`` = (nodes, ranks per
  node)): all-gathers and reduce-scatters stay on the node's NVLink, only an all-reduce of the gradient shards
  crosses nodes. ``auto`` (the default) is hybrid when ``train.nnodes > 1``.
- **Units.** Each decoder layer and the token embedding (every rank calls them once per micro-batch), and the
  output projection, which the decoder calls once for every loss chunk (``DocEVDecoder``, models/docev/
  _layers.py; called once per chunk, FSDP would reduce-scatter and re-gather it per chunk, and ranks with
  different chunk counts would mismatch; S is padded to a multiple of the chunk count). It and the root are not
  resharded between forward and backward (backward starts with them). The root holds the rest (final norm,
  connector, ``image_newline``; a trainable tower): a rank whose micro-batch has no image skips the vision path,
  so it cannot be a unit of its own. An image-less micro-batch gives the vision path zero gradients
  (``DocEVModel._zero_vision_path``), so every rank reduces the same tensors in the same dtype, also under
  ``last_micro_batch`` with mixed precision. (``set_reduce_scatter_unused_params``, which used to zero-fill them
  instead, is gone: it is not in torch 2.11, the lent GPU machine's, and the zero path made it redundant.)
- **Frozen vision tower replicated, not sharded.** With ``encoder_trainable: false`` its parameters are
  ``ignored_params`` of FSDP, cast to the compute dtype and kept whole on every rank: no all-gather per
  micro-batch, no reduce-scatter (it has no gradient), nothing for an image-less rank to mismatch. Cost: the
  tower in the compute dtype on every rank (0.83 GB in bf16 at preview size) instead of 1/N of it; with a bf16
  base its bits are the base's. A trainable tower stays in the root unit, sharded and trained.
- **Gradient reduction** (``train.gradient_reduction``, ``sync_gradients`` before each micro-batch):
  ``every_micro_batch`` reduces each micro-batch; ``last_micro_batch_across_nodes`` (hybrid) reduce-scatters
  within the node every micro-batch and all-reduces across nodes only on the step's last one (no extra memory);
  ``last_micro_batch`` skips every reduction until the last micro-batch (``set_requires_gradient_sync``): each
  rank then holds the unsharded gradients of every trainable parameter between micro-batches, accumulated in
  the reduce dtype (FSDP2 upcasts them): 4 bytes × 11.0B trainable parameters = ~44 GB with the preview's fp32
  master weights (~22 GB with bf16 ones), instead of 1/N of it.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer

from docev.config import FsdpStrategy, GradientReduction, resolve_strategy
from docev.training.load import Rows, fill_model

log = utils.get_logger("INFO")

_SHARDED_UNITS = re.compile(r"decoder\.layers\.\d+|tok_embeddings|decoder\.output")
_KEPT_GATHERED = "decoder.output"  # not resharded after forward: backward starts with it
# AdamW's first steps move a weight by about lr; bf16 keeps 8 significant bits, so an update is lost
# when lr < ulp(w) / 2 = 2^(floor(log2 |w|) - 8), i.e. for |w| ≳ 256 · lr.
_BF16_LOST_ABOVE = 256
BF16_LR_WARNING_BELOW = 1e-4


def shard_condition(name: str, module: torch.nn.Module) -> bool:
    """FSDP units besides the root: each decoder layer, the token embedding and the output projection (see the
    module docstring)."""
    return _SHARDED_UNITS.fullmatch(name) is not None


def mixed_precision_policy(compute_dtype: torch.dtype, master_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """Gather parameters in the compute dtype and reduce gradients in the master dtype; the default policy
    (no casts) when the two agree."""
    if compute_dtype == master_dtype:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=master_dtype)


def precision_warning(master_dtype: torch.dtype, lr: float | None) -> str | None:
    """What bf16 master weights do to a small learning rate, or None when nothing is lost."""
    if master_dtype != torch.bfloat16 or lr is None or lr >= BF16_LR_WARNING_BELOW:
        return None
    return (
        f"master_dtype: bf16 with optimizer.lr {lr:g} < {BF16_LR_WARNING_BELOW:g}: weights, gradients and AdamW "
        f"moments are bf16, so an update of ~lr is below half a bf16 ulp for every weight with |w| ≳ "
        f"{_BF16_LOST_ABOVE * lr:.2g} and is rounded away (most of a fine-tune's updates); gradients also "
        "accumulate in bf16. Use master_dtype: fp32 unless memory forbids it"
    )


def build_model(model_cfg: DictConfig, master_dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device, parameters in the master dtype (no memory is allocated)."""
    with training.set_default_dtype(master_dtype), torch.device("meta"):
        return config.instantiate(model_cfg)


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


def run_mesh(strategy: FsdpStrategy, *, nnodes: int, nproc_per_node: int, device_type: str) -> DeviceMesh:
    """The mesh of a run of ``dist.get_world_size()`` ranks under ``train.fsdp_strategy``."""
    resolved = resolve_strategy(strategy, nnodes)
    world = dist.get_world_size()
    return build_mesh(resolved, world_size=world, ranks_per_node=nproc_per_node if resolved == "hybrid" else world,
                      device_type=device_type)  # fmt: skip


def is_hybrid(mesh: DeviceMesh | None) -> bool:
    return mesh is not None and mesh.ndim == 2


def frozen_tower(model: nn.Module) -> list[nn.Parameter]:
    """The vision tower's parameters when none of them trains (they are replicated, not sharded)."""
    params = list(model.encoder.parameters())
    return [] if any(p.requires_grad for p in params) else params


def apply_fsdp(
    model: nn.Module,
    mp_policy: MixedPrecisionPolicy,
    mesh: DeviceMesh | None = None,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Shard a DocEV model (on the meta device or not) in place with the layout of the module docstring:
    ``fully_shard`` on each unit of ``shard_condition`` (bottom-up), then on the root, the frozen tower left
    out and cast to ``compute_dtype`` (default: the policy's ``param_dtype``; it never trains, so it needs no
    master copy). ``mesh`` None shards over every rank; a 2-D (replicate, shard) mesh gives hybrid sharding."""
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy}
    units = [(n, m) for n, m in reversed(list(model.named_modules())) if shard_condition(n, m)]
    if not units:
        raise ValueError("model: no decoder layer or token embedding to shard; is it a DocEV model?")
    frozen = frozen_tower(model)
    dtype = compute_dtype or mp_policy.param_dtype
    if frozen and dtype is not None:
        model.encoder.to(dtype)
    for name, module in units:
        fully_shard(module, reshard_after_forward=name != _KEPT_GATHERED, **kwargs)
    fully_shard(model, reshard_after_forward=False, ignored_params=set(frozen) or None, **kwargs)
    # The root returns the loss chunks as views of one projection (docev.models.docev._layers: one gather and one
    # reduce-scatter of the output matrix per micro-batch); FSDP2 warns that an in-place op on a view would lose
    # its pre-backward hook, but the chunked loss only reads them. Only this class's warning is silenced.
    warnings.filterwarnings(
        "ignore",
        message=rf"FSDP2-wrapped module \({type(model).__name__}\) returned a view tensor",
        category=UserWarning,
    )


def sync_gradients(model: FSDPModule, mode: GradientReduction, *, last: bool, hybrid: bool) -> None:
    """Before each micro-batch's forward: whether its backward reduces gradients (``last``: the step's last)."""
    if mode == "last_micro_batch":
        model.set_requires_gradient_sync(last)
    elif mode == "last_micro_batch_across_nodes" and hybrid:  # one node, full sharding: nothing crosses nodes
        model.set_requires_all_reduce(last)


# torchtune compiles every TransformerSelfAttentionLayer: the vision tower's and the decoder's layers share one code
# object, and dynamo's recompile limit counts the graphs of a code object. What varies is marked dynamic (the
# tower's tile count; S after its first change, by automatic dynamic shapes; packed rows have one S), so a run
# needs a handful (tests/training/test_compile_graphs.py: at most 4). Past the limit dynamo would silently run
# the layers eager (eager flex at 8192 tokens materialises the whole score matrix): it is set here, and hitting it
# raises instead.
RECOMPILE_LIMIT = 8


def configure_compile() -> None:
    """The recompile limit set deliberately, and hitting it an error, not a silent fall-back to eager."""
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def graphs_per_code_object() -> dict[str, int]:
    """Compiled graphs held per code object of the compiled layers (the quantity the recompile limit bounds)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    code = TransformerSelfAttentionLayer.forward.__code__
    return {code.co_qualname: len(_debug_get_cache_entry_list(code))}


def parallelize_model(
    model: torch.nn.Module,
    *,
    compute_dtype: torch.dtype,
    master_dtype: torch.dtype,
    compile: bool = False,
    activation_checkpointing: bool = False,
    mesh: DeviceMesh | None = None,
    verbose: bool = False,
) -> torch.nn.Module:
    """Compile per layer, checkpoint activations per self-attention layer, shard (on the meta device)."""
    if compile:
        configure_compile()
        training.compile_model(model, verbose=verbose)
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    apply_fsdp(model, mixed_precision_policy(compute_dtype, master_dtype), mesh=mesh, compute_dtype=compute_dtype)
    return model


def load_model_state(
    model: torch.nn.Module,
    state_dict: Mapping[str, Rows] | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    fill: Callable[[torch.nn.Module, Mapping[str, Rows], torch.device], None] | None = None,
) -> None:
    """Each rank reads and keeps only its shard of the full state dict (``docev.training.load``: rows, cast to
    the parameters' dtype); ``None`` leaves the shards allocated but unset, for a sharded (DCP) checkpoint to
    fill. The RoPE caches, which are not in the state dict, are made in the compute dtype."""
    if state_dict is None:
        model.to_empty(device=device)
    elif fill is not None:  # an adapter run: base + trained tensors, adapters initialised (docev.training.peft)
        fill(model, state_dict, device)
    else:
        missing, unexpected = fill_model(model, state_dict, device)
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit the model: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")  # fmt: skip
    with training.set_default_dtype(compute_dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.validate_no_params_on_meta_device(model)


def setup_model(
    model_cfg: DictConfig,
    state_dict: Mapping[str, Rows] | None,
    device: torch.device,
    *,
    compute_dtype: torch.dtype,
    master_dtype: torch.dtype,
    compile: bool = False,
    activation_checkpointing: bool = False,
    mesh: DeviceMesh | None = None,
    fill: Callable[[torch.nn.Module, Mapping[str, Rows], torch.device], None] | None = None,
) -> torch.nn.Module:
    """Build on meta, parallelize, fill from ``state_dict`` (None: left for a sharded checkpoint); every rank
    returns with its shard."""
    start = time.perf_counter()
    verbose = dist.get_rank() == 0
    model = build_model(model_cfg, master_dtype)
    parallelize_model(
        model,
        compute_dtype=compute_dtype,
        master_dtype=master_dtype,
        compile=compile,
        activation_checkpointing=activation_checkpointing,
        mesh=mesh,
        verbose=verbose,
    )
    load_model_state(model, state_dict, device, compute_dtype, fill)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # a DTensor counts its global shape
    utils.log_rank_zero(
        log,
        f"Model ready in {time.perf_counter() - start:.1f} s (~{trainable / 1e6:.1f}M trainable parameters, "
        f"master {str(master_dtype).removeprefix('torch.')}, compute {str(compute_dtype).removeprefix('torch.')})",
    )
    dist.barrier()
    return model
