"""Parameterised DocEV components from torchtune modules (DESIGN §4).

Every width comes from a ``DocEVArch`` (``docev.models.arch``) or its fields, so the builders, the
checkpoint writer and the weight converter agree on shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, get_args

from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.low_precision import FrozenNF4Linear
from torchtune.modules.model_fusion import register_fusion_module
from torchtune.modules.peft import LORA_ATTN_MODULES, DoRALinear, LoRALinear, get_lora_module_names

from docev.models.arch import DocEVArch
from docev.models.docev._attention import AttentionKind, attention_call
from docev.models.docev._connector import LDPv2Connector
from docev.models.docev._fusion import DocEVModel
from docev.models.docev._layers import DocEVDecoder, SyncFreeFusionEmbedding
from docev.models.docev._vision import SiglipVisionEncoder

_ATTN_MODULES = get_args(LORA_ATTN_MODULES)
_NF4_BLOCK = 64 * 256  # torchao to_nf4 defaults: block_size 64, scaler_block_size 256


def siglip_vision_encoder(
    *,
    tile_size: int,
    patch_size: int,
    embed_dim: int,
    num_layers: int,
    num_heads: int,
    intermediate_dim: int,
    norm_eps: float = 1e-6,
) -> SiglipVisionEncoder:
    """SigLIP ViT: conv patch embed with bias, pre-LN non-causal layers with q/k/v/out biases, GELU tanh."""
    if tile_size % patch_size:
        raise ValueError(f"tile_size {tile_size} is not a multiple of patch_size {patch_size}")
    head_dim = embed_dim // num_heads
    grid = tile_size // patch_size
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, embed_dim),
            k_proj=nn.Linear(embed_dim, embed_dim),
            v_proj=nn.Linear(embed_dim, embed_dim),
            output_proj=nn.Linear(embed_dim, embed_dim),
            max_seq_len=grid * grid,
            is_causal=False,
        )
        mlp = FeedForward(
            gate_proj=nn.Linear(embed_dim, intermediate_dim),
            down_proj=nn.Linear(intermediate_dim, embed_dim),
            activation=nn.GELU(approximate="tanh"),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
                mlp_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
            )
        )
    return SiglipVisionEncoder(
        patch_embed=nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size),
        num_positions=grid * grid,
        layers=layers,
        post_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
    )


def ldpv2_connector(*, in_dim: int, out_dim: int, grid: int) -> LDPv2Connector:
    """Linear→GELU→Linear, avg-pool, depthwise 3×3 PEG; registered as a fusion module."""
    connector = LDPv2Connector(
        mlp=FeedForward(
            gate_proj=nn.Linear(in_dim, out_dim), down_proj=nn.Linear(out_dim, out_dim), activation=nn.GELU()
        ),
        peg=nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, groups=out_dim),
        grid=grid,
    )
    register_fusion_module(connector)
    return connector


def docev_decoder(
    *,
    vocab_size: int,
    fusion_vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float,
    norm_eps: float = 1e-5,
) -> DocEVDecoder:
    """Llama decoder (GQA, SwiGLU, RMSNorm, RoPE) with ``fusion_vocab_size`` trainable extra embedding
    rows and an untied output of ``vocab_size + fusion_vocab_size`` rows (one call for every loss chunk,
    see ``_layers.py``)."""
    return _llama_decoder(
        _plain_linear, vocab_size=vocab_size, fusion_vocab_size=fusion_vocab_size, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=num_kv_heads, embed_dim=embed_dim, intermediate_dim=intermediate_dim,
        max_seq_len=max_seq_len, rope_base=rope_base, norm_eps=norm_eps,
    )  # fmt: skip


def lora_docev_decoder(
    *,
    lora_attn_modules: list[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    **decoder_args: Any,
) -> DocEVDecoder:
    """``docev_decoder`` with torchtune ``LoRALinear`` (``DoRALinear`` with ``use_dora``) on the named
    projections. ``lora_attn_modules`` uses torchtune's names (``q_proj``, ``k_proj``, ``v_proj``,
    ``output_proj``); the MLP adapters go on ``w1``/``w2``/``w3``. With ``quantize_base`` every frozen
    linear of the decoder layers (adapted or not) holds its weight in NF4, as torchtune's QLoRA builders
    do; the output projection stays in the training dtype unless it carries an adapter."""
    unknown = sorted(set(lora_attn_modules) - set(_ATTN_MODULES))
    if unknown:
        raise ValueError(f"lora_attn_modules: {unknown} are not attention projections (use {list(_ATTN_MODULES)})")
    targets = set(get_lora_module_names(list(lora_attn_modules), apply_lora_to_mlp, apply_lora_to_output))
    if not targets:
        raise ValueError("no LoRA target: set lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output")
    adapter_cls = DoRALinear if use_dora else LoRALinear

    def linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
        if quantize_base and name != "output" and (in_dim * out_dim) % _NF4_BLOCK:
            raise ValueError(
                f"quantize_base: {name} holds {in_dim}x{out_dim} weights, not a multiple of {_NF4_BLOCK} "
                "(torchao's NF4 quantises blocks of 64 values with scalers in blocks of 256)"
            )
        if name in targets:
            return adapter_cls(in_dim, out_dim, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                               quantize_base=quantize_base and name != "output")  # fmt: skip
        if quantize_base and name != "output":
            return FrozenNF4Linear(in_dim, out_dim, bias=False)
        return nn.Linear(in_dim, out_dim, bias=False)

    return _llama_decoder(linear, **decoder_args)


def _plain_linear(name: str, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=False)


def _llama_decoder(
    linear: Callable[[str, int, int], nn.Module],
    *,
    vocab_size: int,
    fusion_vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float,
    norm_eps: float = 1e-5,
) -> DocEVDecoder:
    """The decoder with every bias-free projection made by ``linear(torchtune name, in, out)``."""
    head_dim = embed_dim // num_heads
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=linear("q_proj", embed_dim, num_heads * head_dim),
            k_proj=linear("k_proj", embed_dim, num_kv_heads * head_dim),
            v_proj=linear("v_proj", embed_dim, num_kv_heads * head_dim),
            output_proj=linear("output_proj", num_heads * head_dim, embed_dim),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
        )
        attn._attention_call = attention_call  # BlockMasks reach flex attention on CPU too (torchtune: CUDA only)
        mlp = FeedForward(
            gate_proj=linear("w1", embed_dim, intermediate_dim),
            down_proj=linear("w2", intermediate_dim, embed_dim),
            up_proj=linear("w3", embed_dim, intermediate_dim),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(embed_dim, eps=norm_eps),
            )
        )
    return DocEVDecoder(
        tok_embeddings=SyncFreeFusionEmbedding(vocab_size, fusion_vocab_size, embed_dim),
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=linear("output", embed_dim, vocab_size + fusion_vocab_size),
    )


def docev(
    arch: DocEVArch,
    *,
    image_token_id: int | None = None,
    decoder_trainable: bool = True,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    lora: Mapping[str, Any] | None = None,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """The fused model at ``arch``'s widths; ``image_token_id`` defaults to the first fusion row.
    ``lora`` (the keyword arguments of ``lora_docev_decoder``) puts adapters on the decoder;
    ``attention``: how packed rows are masked (``_attention.py``)."""
    encoder = siglip_vision_encoder(
        tile_size=arch.tile_size,
        patch_size=arch.patch_size,
        embed_dim=arch.vision_width,
        num_layers=arch.vision_layers,
        num_heads=arch.vision_heads,
        intermediate_dim=arch.vision_mlp,
        norm_eps=arch.vision_eps,
    )
    decoder_args = dict(
        vocab_size=arch.vocab_size,
        fusion_vocab_size=arch.fusion_vocab_size,
        num_layers=arch.layers,
        num_heads=arch.heads,
        num_kv_heads=arch.kv_heads,
        embed_dim=arch.dim,
        intermediate_dim=arch.mlp,
        max_seq_len=arch.max_seq_len,
        rope_base=arch.rope_base,
        norm_eps=arch.norm_eps,
    )
    decoder = docev_decoder(**decoder_args) if lora is None else lora_docev_decoder(**lora, **decoder_args)
    return DocEVModel(
        decoder,
        encoder,
        ldpv2_connector(in_dim=arch.vision_width, out_dim=arch.dim, grid=arch.patch_grid),
        image_token_id=arch.image_token_id if image_token_id is None else image_token_id,
        tile_size=arch.tile_size,
        patch_size=arch.patch_size,
        decoder_trainable=decoder_trainable,
        encoder_trainable=encoder_trainable,
        fusion_trainable=fusion_trainable,
        attention=attention,
    )
