"""Attention for packed rows: per-token document ids become the mask on the device.

The collate ships ``document_ids`` [B, S] (8 bytes a token) instead of a [B, S, S] boolean mask (S² bytes a
row: 64 MiB at S = 8192, built on the host and copied every micro-batch). The model turns them into

- a flex-attention ``BlockMask`` (``attention: flex``): only the blocks a document touches are computed, and
  the kernel stays a fused one (a dense ``attn_mask`` makes SDPA fall back to a kernel that scores all S²
  pairs); or
- the dense block-causal mask (``attention: sdpa``), what CPU training uses: flex attention has no backward
  on CPU in torch 2.13 (its forward compiles and runs there, so parity is testable on CPU).

``auto`` picks flex where torchtune would (CUDA, compute capability ≥ 7.5) and the dense mask elsewhere.
Unpacked rows pass no mask at all, so SDPA keeps ``is_causal`` and the flash kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Literal

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionKind = Literal["auto", "sdpa", "flex"]
MaskType = torch.Tensor | BlockMask


def use_flex(kind: AttentionKind, device: torch.device) -> bool:
    """Whether packed rows on ``device`` get a ``BlockMask`` under ``kind``."""
    if kind == "auto":
        return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 5)
    return kind == "flex"


def dense_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool: token q may attend to token k when k ≤ q and both lie in the same document."""
    s = document_ids.shape[1]
    same = document_ids[:, :, None] == document_ids[:, None, :]
    return same & torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The same mask as ``dense_document_mask`` as a flex ``BlockMask``, built where the ids are (the device).

    Compiled on CUDA so it never materialises S² entries; on CPU (tests, the benchmark) it is built eagerly.
    """
    b, s = document_ids.shape

    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    return create_block_mask(
        mask_mod, b, None, s, s, device=document_ids.device, _compile=document_ids.device.type == "cuda"
    )


def document_mask(document_ids: torch.Tensor, kind: AttentionKind) -> MaskType:
    """The mask of packed rows for the attention ``kind`` on the ids' device."""
    if use_flex(kind, document_ids.device):
        return document_block_mask(document_ids)
    return dense_document_mask(document_ids)


@cache
def _compiled_flex():
    # Flex attention is only fast compiled; dynamic=False because packed rows have one fixed length.
    return torch.compile(flex_attention, dynamic=False)


@torch.compiler.disable(recursive=False)
def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    # Outside any enclosing torch.compile graph (no nested compile), as torchtune's compile_friendly_flex_attention.
    return _compiled_flex()(q, k, v, block_mask=block_mask)


def attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: MaskType | None,
    dropout_p: float,
    is_causal: bool,
) -> torch.Tensor:
    """``MultiHeadAttention._attention_call`` on every device: a ``BlockMask`` goes to flex attention (torchtune's
    own call only does that on CUDA), a tensor mask or none to SDPA, as torchtune does."""
    if isinstance(mask, BlockMask):
        if dropout_p > 0.0:
            raise ValueError("flex attention has no dropout; set attn_dropout to 0")
        return _flex(q, k, v, mask)
    if mask is not None:
        mask = mask[:, None, :, :]
    return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def attended_pairs(doc_lengths: Sequence[int]) -> int:
    """Query-key pairs a row's documents attend (causal, within a document: n(n+1)/2 each; padding none): the
    attention FLOPs of MFU, one definition for packed (flex) and unpacked (SDPA) rows, whatever the kernel
    computes besides (flex's partly masked 128 × 128 blocks, SDPA's padded tail)."""
    return sum(n * (n + 1) // 2 for n in doc_lengths)
