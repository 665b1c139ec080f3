"""Per-GPU memory of a run, on paper: ``docev plan-memory``.

Everything is counted from models built on the meta device (no weights, no memory), not from formulas:

- **parameters**: the bytes of every parameter in the training dtype (NF4 weights: the bytes of their
  packed data, scalers and tables), divided by the ranks, as FSDP2 shards every parameter but a frozen
  vision tower, which every rank holds whole (``docev.training.parallelize``);
- **gradients**: the bytes of the trainable parameters, sharded likewise;
- **optimizer state**: the optimizer of the config stepped once on a small real parameter gives its state
  bytes per trainable element (AdamW: two tensors in the parameter's dtype), times the trainable elements;
- **activations**: one forward at ``tokenizer.max_seq_len`` × ``batch_size`` on the meta device with
  ``saved_tensors_hooks`` adding up what autograd keeps for the backward (with activation checkpointing:
  each layer's input plus one layer's own saved tensors while it is recomputed). Not sharded: each rank
  holds its own micro-batch's. Text tokens only; a frozen vision tower keeps nothing for the backward.

Not counted: the all-gathered unsharded layer FSDP holds during its compute (one layer's parameters),
temporary buffers, CUDA context and allocator fragmentation (typically several GB): leave head-room.
"""

from __future__ import annotations

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

from docev.config import LORA_DEFAULTS, DocEVConfig
from docev.models.docev import DocEVArch, docev_from_arch
from docev.models.docev._arch import ARCHS
from docev.training.parallelize import frozen_tower

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    setup: str  # full, lora, qlora
    world_size: int
    params: int  # bytes per GPU
    grads: int
    optimizer: int
    activations: int
    trainable: int  # trainable elements, whole model
    note: str = ""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def arch_of(cfg: DocEVConfig) -> DocEVArch:
    """The architecture the config's builder builds (``docev_tiny`` / ``lora_docev_preview`` ...)."""
    name = cfg.model.component.rpartition(".")[2]
    for key, make in ARCHS.items():
        if name.endswith(f"_{key}"):
            return make()
    raise ValueError(f"model._component_ {cfg.model.component}: plan-memory knows the *_tiny and *_preview builders")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; an NF4 tensor is counted by its inner tensors (packed data, scalers, tables)."""
    if isinstance(t, NF4Tensor):
        return sum(tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def optimizer_bytes_per_element(cfg: DocEVConfig, dtype: torch.dtype) -> float:
    """State bytes per trainable element of the config's optimizer, from one real step on 1024 elements."""
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
    """The model of ``setup`` at the config's widths on the meta device, in the training dtype."""
    m = cfg.model
    flags = {"encoder_trainable": m.encoder_trainable, "fusion_trainable": m.fusion_trainable}
    lora = None
    if setup != "full":
        lora = {k: (getattr(m, k) if m.is_lora else v) for k, v in LORA_DEFAULTS.items()}
        lora["quantize_base"] = setup == "qlora"
    dtype = PRECISION_STR_TO_DTYPE[cfg.dtype]
    with training.set_default_dtype(dtype), torch.device("meta"):
        return docev_from_arch(arch, decoder_trainable=setup == "full", lora=lora, **flags)


def activation_bytes(model: nn.Module, cfg: DocEVConfig, arch: DocEVArch) -> int:
    """Bytes autograd saves for the backward in one micro-batch at ``max_seq_len`` (see the module docstring)."""
    seq, batch = cfg.tokenizer.max_seq_len, cfg.batch_size
    # The decoder from its input embeddings (FusionEmbedding's masked_select has no meta kernel; an
    # embedding lookup saves only the ids). They require grad: the trained fusion rows are among them.
    h = torch.zeros(batch, seq, arch.dim, dtype=PRECISION_STR_TO_DTYPE[cfg.dtype], device="meta", requires_grad=True)
    saved = _saved_bytes(lambda: model.decoder(h), model, logits=True)
    if not cfg.enable_activation_checkpointing:
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


def plan(cfg: DocEVConfig, world_size: int, setups: tuple[str, ...] = ("full", "lora", "qlora")) -> list[MemoryPlan]:
    """One ``MemoryPlan`` per setup; a setup the architecture cannot build says why in ``note``."""
    arch = replace(arch_of(cfg), max_seq_len=max(arch_of(cfg).max_seq_len, cfg.tokenizer.max_seq_len))
    dtype = PRECISION_STR_TO_DTYPE[cfg.dtype]
    per_element = optimizer_bytes_per_element(cfg, dtype)
    out = []
    for setup in setups:
        try:
            model = build_meta(cfg, arch, setup)
        except ValueError as exc:
            out.append(MemoryPlan(setup, world_size, 0, 0, 0, 0, 0, note=str(exc)))
            continue
        replicated = {id(p) for p in frozen_tower(model)}
        params = sum(tensor_bytes(p) for p in model.parameters() if id(p) not in replicated) // world_size
        params += sum(tensor_bytes(p) for p in model.parameters() if id(p) in replicated)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = sum(tensor_bytes(p) for p in trainable)
        n_trainable = sum(p.numel() for p in trainable)
        activations = activation_bytes(model, cfg, arch)
        out.append(
            MemoryPlan(
                setup,
                world_size,
                params,
                grads // world_size,
                int(n_trainable * per_element) // world_size,
                activations,
                n_trainable,
            )  # fmt: skip
        )
    return out


def format_plans(plans: list[MemoryPlan], cfg: DocEVConfig) -> str:
    """The table ``docev plan-memory`` prints (GiB per GPU)."""
    head = (
        f"per-GPU memory (GiB), {plans[0].world_size} GPU(s), dtype {cfg.dtype}, batch {cfg.batch_size} × "
        f"max_seq_len {cfg.tokenizer.max_seq_len}, activation checkpointing "
        f"{'on' if cfg.enable_activation_checkpointing else 'off'}"
    )
    lines = [head, f"{'setup':<7} {'params':>9} {'grads':>9} {'optim':>9} {'activ':>9} {'total':>9}  trainable"]
    for p in plans:
        if p.note:
            lines.append(f"{p.setup:<7} not buildable: {p.note}")
            continue
        cells = [p.params, p.grads, p.optimizer, p.activations, p.total]
        lines.append(f"{p.setup:<7} " + " ".join(f"{c / GIB:9.2f}" for c in cells) + f"  {p.trainable:,}")
    return "\n".join(lines)
