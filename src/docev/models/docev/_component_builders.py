"""Parameterised DocEV components from torchtune modules (DESIGN §4).

Every width comes from a ``DocEVArch`` (``_arch.py``) or its fields, so the builders, the
checkpoint writer and the weight converter agree on shapes.
"""

from __future__ import annotations

from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.model_fusion import register_fusion_module

from docev.models.docev._arch import DocEVArch
from docev.models.docev._attention import AttentionKind, attention_call
from docev.models.docev._connector import LDPv2Connector
from docev.models.docev._fusion import DocEVModel
from docev.models.docev._layers import ChunkedOutputProjection, DocEVDecoder, SyncFreeFusionEmbedding
from docev.models.docev._vision import SiglipVisionEncoder


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
    rows and an untied output of ``vocab_size + fusion_vocab_size`` rows (projected in one call for all loss
    chunks, see ``_output.py``)."""
    head_dim = embed_dim // num_heads
    rope = RotaryPositionalEmbeddings(dim=head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=nn.Linear(embed_dim, num_heads * head_dim, bias=False),
            k_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            v_proj=nn.Linear(embed_dim, num_kv_heads * head_dim, bias=False),
            output_proj=nn.Linear(num_heads * head_dim, embed_dim, bias=False),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
        )
        attn._attention_call = attention_call  # BlockMasks reach flex attention on CPU too (torchtune: CUDA only)
        mlp = FeedForward(
            gate_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
            down_proj=nn.Linear(intermediate_dim, embed_dim, bias=False),
            up_proj=nn.Linear(embed_dim, intermediate_dim, bias=False),
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
        output=ChunkedOutputProjection(embed_dim, vocab_size + fusion_vocab_size, bias=False),
    )


def docev(
    arch: DocEVArch,
    *,
    image_token_id: int | None = None,
    decoder_trainable: bool = True,
    encoder_trainable: bool = False,
    fusion_trainable: bool = True,
    attention: AttentionKind = "auto",
) -> DocEVModel:
    """The fused model at ``arch``'s widths; ``image_token_id`` defaults to the first fusion row.
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
    decoder = docev_decoder(
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
