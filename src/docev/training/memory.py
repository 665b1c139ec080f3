"""Per-GPU memory of a run, on paper: ``docev plan-memory``.

Everything is counted from models built on the meta device (no weights, no memory), not from formulas, and
laid out as ``docev.training.parallelize`` lays out the run:

- **shard group**: FSDP2 shards over all ranks (``train.fsdp_strategy`` full) or within a node (hybrid: the
  ``nproc_per_node`` ranks of a node hold one copy between them, each node another), so per-GPU state is
  divided by the shard group, not by every GPU;
- **parameters**: every parameter in ``master_dtype`` (the precision the run keeps them in; compute runs in
  ``dtype`` on all-gathered copies), each sharded on dim 0 as FSDP2 does (padded: the largest shard is
  ``ceil(rows / group)`` rows), NF4 weights by their packed data, scalers and tables; a frozen vision tower
  is replicated whole on every rank in the compute dtype;
- **gradients**: the trainable parameters' shards in ``master_dtype`` (FSDP2 reduces in it); with
  ``train.gradient_reduction: last_micro_batch`` every rank holds the *unsharded* gradients between
  micro-batches (in the reduce dtype, also ``master_dtype``);
- **optimizer state**: the optimizer of the config stepped once on a small real parameter in
  ``master_dtype`` gives its state bytes per trainable element (AdamW: two tensors), times the trainable
  elements of the shard;
- **activations**: one forward at ``tokenizer.max_seq_len`` × ``batch_size`` on the meta device in the
  compute dtype with ``saved_tensors_hooks`` adding up what autograd keeps for the backward (with activation
  checkpointing: each layer's input plus one layer's own saved tensors while it is recomputed). Not sharded:
  each rank holds its own micro-batch's. Text tokens only; a frozen vision tower keeps nothing for the
  backward.

Not counted: the all-gathered unsharded layer FSDP holds during its compute (one layer's parameters),
temporary buffers, CUDA context and allocator fragmentation (typically several GB): leave head-room.
``check_fits`` refuses a plan above the GPU's memory and names the single config changes that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune import config as tt_config
from torchtune import training
from torchtune.modules import MultiHeadAttention
from torchtune.training.precision import PRECISION_STR_TO_DTYPE

from docev.config import LORA_DEFAULTS, ConfigError, DocEVConfig, resolve_strategy, validate_dict
from docev.models.arch import arch_of_component
from docev.models.docev import DocEVArch, docev_from_arch
from docev.training.parallelize import frozen_tower

GIB = 2**30


# Memory a CUDA device reports (torch.cuda.get_device_properties().total_memory), by train.resources.gpu_type
GPU_MEMORY_GIB = {"nvidia-h100": 79.2, "nvidia-h200": 139.8, "nvidia-a100": 79.2, "nvidia-l40s": 44.4}


@dataclass(frozen=True)
class MemoryPlan:
    setup: str  # full, lora, qlora
    world_size: int
    strategy: str  # full or hybrid (train.fsdp_strategy resolved)
    shard_group: int  # ranks one copy of the sharded state is split over
    params: int  # bytes per GPU
    grads: int
    optimizer: int
    activations: int
    trainable: int  # trainable elements, whole model
    note: str = ""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form: GiB per GPU."""
        gib = {f"{k}_gib": round(getattr(self, k) / GIB, 3) for k in ("params", "grads", "optimizer", "activations")}
        return {"setup": self.setup, "world_size": self.world_size, "strategy": self.strategy,
                "shard_group": self.shard_group, **gib, "total_gib": round(self.total / GIB, 3),
                "trainable": self.trainable, "note": self.note}  # fmt: skip


def arch_of(cfg: DocEVConfig) -> DocEVArch:
    """The architecture the config's builder builds (``docev_tiny`` / ``lora_docev_preview`` ...)."""
    return arch_of_component(cfg.model.component)


def checkpoint_bytes(model: torch.nn.Module, master_dtype: torch.dtype, *, trained_only: bool = False) -> int:
    """Planned size of one checkpoint: every saved weight in ``master_dtype`` plus two AdamW moments per
    trained weight (``trained_only``: an adapter run saves its trained tensors only)."""
    item = torch.empty((), dtype=master_dtype).element_size()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = trained if trained_only else sum(p.numel() for p in model.parameters())
    return (weights + 2 * trained) * item


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; an NF4 tensor is counted by its inner tensors (packed data, scalers, tables)."""
    if isinstance(t, NF4Tensor):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def optimizer_bytes_per_element(cfg: DocEVConfig, dtype: torch.dtype) -> float:
    """State bytes per trainable element of the config's optimizer on ``dtype`` parameters (the master dtype),
    from one real step on 1024 elements."""
    section = cfg.to_dict()["optimizer"]
    section = {k: v for k, v in section.items() if k != "fused"}
    param = nn.Parameter(torch.zeros(1024, dtype=dtype))
    optimizer = tt_config.instantiate(OmegaConf.create(section), [param])
    param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state[param]
    per_param = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return per_param / param.numel()


def build_meta(cfg: DocEVConfig, arch: DocEVArch, setup: str) -> nn.Module:
    """The model of ``setup`` at the config's widths on the meta device, in the compute dtype (activations are
    counted on it; ``state_bytes`` sizes parameters in the master dtype from their shapes)."""
    m = cfg.model
    flags = {"encoder_trainable": m.encoder_trainable, "fusion_trainable": m.fusion_trainable}
    lora = None
    if setup != "full":
        lora = {k: (getattr(m, k) if m.is_lora else v) for k, v in LORA_DEFAULTS.items()}
        lora["quantize_base"] = setup == "qlora"
    dtype = PRECISION_STR_TO_DTYPE[cfg.dtype]
    with training.set_default_dtype(dtype), torch.device("meta"):
        return docev_from_arch(arch, decoder_trainable=setup == "full", lora=lora, **flags)


def activation_bytes(model: nn.Module, cfg: DocEVConfig, arch: DocEVArch, checkpointing: bool | None = None) -> int:
    """Bytes autograd saves for the backward in one micro-batch at ``max_seq_len`` (see the module docstring);
    ``checkpointing`` None: the config's ``enable_activation_checkpointing``."""
    seq, batch = cfg.tokenizer.max_seq_len, cfg.batch_size
    # The decoder from its input embeddings (FusionEmbedding's masked_select has no meta kernel; an
    # embedding lookup saves only the ids). They require grad: the trained fusion rows are among them.
    h = torch.zeros(batch, seq, arch.dim, dtype=PRECISION_STR_TO_DTYPE[cfg.dtype], device="meta", requires_grad=True)
    saved = _saved_bytes(lambda: model.decoder(h), model, logits=True)
    if not (cfg.enable_activation_checkpointing if checkpointing is None else checkpointing):
        return saved
    layer = model.decoder.layers[0]
    per_layer = _saved_bytes(lambda: layer(h), layer, logits=False)
    decoder_layers = len(model.decoder.layers)
    inputs = decoder_layers * h.numel() * h.element_size()
    return saved - decoder_layers * per_layer + inputs + per_layer


class _FlashSaved(torch.autograd.Function):
    """Attention that saves for the backward what FlashAttention saves (q, k, v, output, float32
    logsumexp per query): on the meta device SDPA would count the math kernel's S×S matrices instead."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_: Any) -> torch.Tensor:
    return _FlashSaved.apply(q, k, v)


def _saved_bytes(forward: Any, model: nn.Module, *, logits: bool) -> int:
    """Bytes of the distinct storages autograd saves during ``forward`` (views of one storage count once);
    ``logits``: the output is the logits, which the loss upcasts to float32 and keeps (torchtune's CE)."""
    storages: dict[int, int] = {}
    # parameters saved for the backward (a linear keeps its weight) are counted as parameters, not here
    params = {id(p) for p in model.parameters()} | {
        p.untyped_storage()._cdata for p in model.parameters() if not isinstance(p, NF4Tensor)
    }

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, NF4Tensor):
            if id(t) not in params:
                storages[id(t)] = tensor_bytes(t)
        elif (storage := t.untyped_storage())._cdata not in params:
            storages[storage._cdata] = storage.nbytes()
        return t

    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    originals = [m._attention_call for m in attentions]
    try:
        for m in attentions:
            m._attention_call = _flash_attention
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
            if isinstance(out, list):
                out = torch.cat(out, dim=1)
            if logits:
                out.float().logsumexp(-1).sum()
    finally:
        for m, call in zip(attentions, originals, strict=True):
            m._attention_call = call
    return sum(storages.values())


def shard_layout(cfg: DocEVConfig, nnodes: int, gpus_per_node: int) -> tuple[str, int]:
    """(strategy, shard group) of ``train.fsdp_strategy`` on ``nnodes`` × ``gpus_per_node`` ranks."""
    strategy = resolve_strategy(cfg.train.fsdp_strategy, nnodes)
    return strategy, (gpus_per_node if strategy == "hybrid" else nnodes * gpus_per_node)


def _shard_bytes(p: torch.Tensor, group: int, element_size: int) -> int:
    """Bytes of the largest FSDP2 shard of ``p`` (dim 0 split in ``ceil(rows / group)`` rows) at ``element_size``."""
    if isinstance(p, NF4Tensor):
        return math.ceil(tensor_bytes(p) / group)
    if p.dim() == 0:
        return element_size
    rows = math.ceil(p.shape[0] / group)
    return rows * math.prod(p.shape[1:]) * element_size


@dataclass(frozen=True)
class _State:
    params: int
    grads: int
    optimizer: int
    trainable: int


def state_bytes(
    model: nn.Module,
    *,
    group: int,
    master: torch.dtype,
    compute: torch.dtype,
    per_element: float,
    unsharded_grads: bool,
) -> _State:
    """Per-GPU bytes of parameters, gradients and optimizer state (see the module docstring)."""
    replicated = {id(p) for p in frozen_tower(model)}
    master_size, compute_size = master.itemsize, compute.itemsize
    params = grads = optimizer_elements = trainable = 0
    for p in model.parameters():
        if id(p) in replicated:
            params += p.numel() * compute_size
            continue
        params += _shard_bytes(p, group, master_size)
        if p.requires_grad:
            trainable += p.numel()
            grads += p.numel() * master_size if unsharded_grads else _shard_bytes(p, group, master_size)
            optimizer_elements += _shard_bytes(p, group, 1)
    return _State(params, grads, int(optimizer_elements * per_element), trainable)


def plan(
    cfg: DocEVConfig, nnodes: int = 1, gpus_per_node: int = 1, setups: tuple[str, ...] = ("full", "lora", "qlora")
) -> list[MemoryPlan]:
    """One ``MemoryPlan`` per setup on ``nnodes`` × ``gpus_per_node`` GPUs; a setup the architecture cannot build
    says why in ``note``."""
    arch = replace(arch_of(cfg), max_seq_len=max(arch_of(cfg).max_seq_len, cfg.tokenizer.max_seq_len))
    master, compute = PRECISION_STR_TO_DTYPE[cfg.master_dtype], PRECISION_STR_TO_DTYPE[cfg.dtype]
    per_element = optimizer_bytes_per_element(cfg, master)
    strategy, group = shard_layout(cfg, nnodes, gpus_per_node)
    world = nnodes * gpus_per_node
    unsharded = cfg.train.gradient_reduction == "last_micro_batch" and world > 1
    out = []
    for setup in setups:
        try:
            model = build_meta(cfg, arch, setup)
        except ValueError as exc:
            out.append(MemoryPlan(setup, world, strategy, group, 0, 0, 0, 0, 0, note=str(exc)))
            continue
        state = state_bytes(model, group=group, master=master, compute=compute, per_element=per_element,
                            unsharded_grads=unsharded)  # fmt: skip
        activations = activation_bytes(model, cfg, arch)
        out.append(MemoryPlan(setup, world, strategy, group, state.params, state.grads, state.optimizer, activations,
                              state.trainable))  # fmt: skip
    return out


def config_setup(cfg: DocEVConfig) -> str:
    """Which of full / lora / qlora the config trains."""
    if not cfg.model.is_lora:
        return "full"
    return "qlora" if cfg.model.quantize_base else "lora"


def gpu_memory_gib(cfg: DocEVConfig) -> float | None:
    """Memory of ``train.resources.gpu_type`` (``GPU_MEMORY_GIB``), None when the type is not stated or known."""
    gpu_type = (cfg.train.resources.gpu_type or "").lower()
    return next((gib for name, gib in GPU_MEMORY_GIB.items() if gpu_type.startswith(name)), None)


_ALTERNATIVES = (  # one config change at a time, cheapest in speed first
    ("enable_activation_checkpointing", True),
    ("train.gradient_reduction", "every_micro_batch"),
    ("master_dtype", "bf16"),
    ("train.fsdp_strategy", "full"),
    ("batch_size", 1),
)


def check_fits(cfg: DocEVConfig, planned: MemoryPlan, gpu_gib: float, *, nnodes: int, gpus_per_node: int) -> None:
    """Raise ``ValueError`` when ``planned`` (the config's setup) exceeds ``gpu_gib`` per GPU, naming each single
    config change of ``_ALTERNATIVES`` whose plan would fit."""
    if planned.total <= gpu_gib * GIB:
        return
    fits = []
    for key, value in _ALTERNATIVES:
        data = cfg.to_dict()
        section, _, leaf = key.rpartition(".")
        target = data[section] if section else data
        if target.get(leaf if section else key) == value:
            continue
        target[leaf if section else key] = value
        try:
            other = validate_dict(data)
        except ConfigError:  # e.g. fsdp_strategy full with last_micro_batch_across_nodes across nodes
            continue
        (alt,) = plan(other, nnodes, gpus_per_node, setups=(planned.setup,))
        if alt.total <= gpu_gib * GIB:
            shown = str(value).lower() if isinstance(value, bool) else value
            fits.append(f"{key}: {shown} ({alt.total / GIB:.1f} GiB)")
    hint = "; would fit with " + ", or ".join(fits) if fits else "; no single change of " + ", ".join(
        k for k, _ in _ALTERNATIVES) + " fits: train LoRA/QLoRA or on more GPUs"  # fmt: skip
    raise ValueError(
        f"memory plan: {planned.setup} on {planned.world_size} GPU(s) ({planned.strategy} sharding, shard group "
        f"{planned.shard_group}) needs {planned.total / GIB:.1f} GiB per GPU (params {planned.params / GIB:.1f}, grads "
        f"{planned.grads / GIB:.1f}, optimizer {planned.optimizer / GIB:.1f}, activations "
        f"{planned.activations / GIB:.1f}) > {gpu_gib:.1f} GiB of GPU memory{hint}"
    )


def format_plans(plans: list[MemoryPlan], cfg: DocEVConfig) -> str:
    """The table ``docev plan-memory`` prints (GiB per GPU)."""
    p0 = plans[0]
    head = (
        f"per-GPU memory (GiB), {p0.world_size} GPU(s), {p0.strategy} sharding over a shard group of "
        f"{p0.shard_group}, master {cfg.master_dtype} / compute {cfg.dtype}, gradient_reduction "
        f"{cfg.train.gradient_reduction}, batch {cfg.batch_size} × max_seq_len {cfg.tokenizer.max_seq_len}, "
        f"activation checkpointing {'on' if cfg.enable_activation_checkpointing else 'off'}"
    )
    lines = [head, f"{'setup':<7} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'total':>9}  trainable"]
    for p in plans:
        if p.note:
            lines.append(f"{p.setup:<7} not buildable: {p.note}")
            continue
        cells = [p.params, p.grads, p.optimizer, p.activations, p.total]
        lines.append(f"{p.setup:<7} " + " ".join(f"{c / GIB:9.2f}" for c in cells) + f"  {p.trainable:,}")
    return "\n".join(lines)


def refuse_oversized(cfg: DocEVConfig, device_gib: float) -> None:
    """The recipe's check on a CUDA device of ``device_gib``: ``check_fits`` for the config's own setup on its
    ``train.nnodes`` × ``train.nproc_per_node`` GPUs; a builder plan-memory does not know is not checked."""
    try:
        arch_of(cfg)
    except ValueError:
        return
    nnodes, gpus = cfg.train.nnodes, cfg.train.nproc_per_node
    (own,) = plan(cfg, nnodes, gpus, setups=(config_setup(cfg),))
    if not own.note:
        check_fits(cfg, own, device_gib, nnodes=nnodes, gpus_per_node=gpus)
