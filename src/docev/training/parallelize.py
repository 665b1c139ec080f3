"""How the recipe's model is built, compiled, activation-checkpointed, sharded and filled (torchtitan's
``parallelize`` step, kept apart from the train loop).

``setup_model`` is the whole sequence; its parts are public so another layout (hybrid sharding over a 2-D
mesh, say) reuses them: ``build_model`` → ``parallelize_model`` (compile, activation checkpointing,
``apply_fsdp``) → ``load_model_state``.

**Precision.** Parameters live in ``master_dtype``; compute runs in ``dtype``. With ``master_dtype: fp32``
and ``dtype: bf16`` FSDP2's ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` all-gathers
bf16 copies for forward/backward, reduce-scatters gradients in fp32 and accumulates them into the fp32
sharded gradients across micro-batches; AdamW's moments follow the fp32 parameters. ``master_dtype: bf16``
keeps everything in bf16 (torchtune's default): an update smaller than half a bf16 ulp of its weight is
rounded away, which at lr 1e-5 is most of them (``precision_warning``). Frozen groups are held in the
master dtype too: loading a bf16 or fp32 base into fp32 is exact, so their bits stay the base's.

**FSDP units** are the modules every rank calls exactly once per micro-batch: each decoder layer and the
token embedding. The rest stays in the root unit (gathered once per micro-batch): the vision path,
because a rank whose micro-batch holds no image skips it, and the output projection, because chunked
output calls it ``ceil``-many times, which depends on the rank's sequence length (33 tokens in 8 chunks
make 7 calls). Sharded separately, either would issue all-gathers the other ranks do not match (a
collective mismatch or a hang). ``set_reduce_scatter_unused_params`` makes image-less ranks contribute
zero gradients for the connector, so every rank reduces the same tensors.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torchtune import config, training, utils
from torchtune.modules import TransformerSelfAttentionLayer

log = utils.get_logger("INFO")

_SHARDED_UNITS = re.compile(r"decoder\.layers\.\d+|tok_embeddings")
# AdamW's first steps move a weight by about lr; bf16 keeps 8 significant bits, so an update is lost
# when lr < ulp(w) / 2 = 2^(floor(log2 |w|) - 8), i.e. for |w| ≳ 256 · lr.
_BF16_LOST_ABOVE = 256
BF16_LR_WARNING_BELOW = 1e-4


def shard_condition(name: str, module: torch.nn.Module) -> bool:
    """FSDP units besides the root: each decoder layer and the token embedding (see the module docstring)."""
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


def apply_fsdp(
    model: torch.nn.Module,
    mp_policy: MixedPrecisionPolicy,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2 ``fully_shard`` on each unit of ``shard_condition`` (bottom-up), then on the root. ``mesh``
    None shards over every rank; a 2-D (replicate, shard) mesh gives hybrid sharding."""
    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "mp_policy": mp_policy}
    units = [m for n, m in reversed(list(model.named_modules())) if shard_condition(n, m)]
    if not units:
        raise ValueError("model: no decoder layer or token embedding to shard; is it a DocEV model?")
    for module in units:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    model.set_reduce_scatter_unused_params(True)


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
        training.compile_model(model, verbose=verbose)
    if activation_checkpointing:
        training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})
    apply_fsdp(model, mixed_precision_policy(compute_dtype, master_dtype), mesh=mesh)
    return model


def load_model_state(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor] | None,
    device: torch.device,
    compute_dtype: torch.dtype,
    fill: Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.device], None] | None = None,
) -> None:
    """Each rank keeps its shard of the full state dict (cast to the parameters' dtype); ``None`` leaves the
    shards allocated but unset, for a sharded (DCP) checkpoint to fill. The RoPE caches, which are not in
    the state dict, are made in the compute dtype."""
    if state_dict is None:
        model.to_empty(device=device)
    elif fill is not None:  # an adapter run: base + trained tensors, adapters initialised (docev.training.peft)
        fill(model, state_dict, device)
    else:
        training.load_from_full_model_state_dict(model, state_dict, device, strict=True)
    with training.set_default_dtype(compute_dtype), device:
        for m in model.modules():
            if hasattr(m, "rope_init"):
                m.rope_init()
    training.validate_no_params_on_meta_device(model)


def setup_model(
    model_cfg: DictConfig,
    state_dict: dict[str, torch.Tensor] | None,
    device: torch.device,
    *,
    compute_dtype: torch.dtype,
    master_dtype: torch.dtype,
    compile: bool = False,
    activation_checkpointing: bool = False,
    mesh: DeviceMesh | None = None,
    fill: Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.device], None] | None = None,
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * dist.get_world_size()
    utils.log_rank_zero(
        log,
        f"Model ready in {time.perf_counter() - start:.1f} s (~{trainable / 1e6:.1f}M trainable parameters, "
        f"master {str(master_dtype).removeprefix('torch.')}, compute {str(compute_dtype).removeprefix('torch.')})",
    )
    dist.barrier()
    return model
