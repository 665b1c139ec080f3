"""SigLIP-style vision tower over fixed-size tiles (DESIGN §4).

The layers are torchtune ``TransformerSelfAttentionLayer``s (non-causal, biased projections,
pre-LayerNorm), so FSDP2 sharding, activation checkpointing and per-layer compile treat them
like the decoder's. DocEV uses the output of the second-to-last layer without the final
LayerNorm: the last layer and ``post_norm`` are held (loaded and saved with the checkpoint)
but never run, so they never receive a gradient.
"""

from __future__ import annotations

import torch
from torch import nn


class SiglipVisionEncoder(nn.Module):
    """Patch embedding + learned absolute positions (no CLS token) + ViT layers.

    Args:
        patch_embed (nn.Conv2d): ``kernel = stride = patch_size`` with bias.
        num_positions (int): (tile_size // patch_size) ** 2.
        layers (nn.ModuleList): every layer of the checkpoint; all but the last are run.
        post_norm (nn.Module): the checkpoint's final LayerNorm (kept for the checkpoint, not run).
    """

    def __init__(self, patch_embed: nn.Conv2d, num_positions: int, layers: nn.ModuleList, post_norm: nn.Module):
        super().__init__()
        if len(layers) < 2:
            raise ValueError(
                f"the vision tower needs at least 2 layers (features come from the second-to-last), got {len(layers)}"
            )
        self.patch_embed = patch_embed
        self.pos_embed = nn.Parameter(torch.empty(num_positions, patch_embed.out_channels))
        nn.init.normal_(self.pos_embed, std=patch_embed.out_channels**-0.5)
        self.layers = layers
        self.post_norm = post_norm

    def unused_params(self) -> list[str]:
        """Parameters that no forward pass reads: the last layer and the final LayerNorm."""
        last = f"layers.{len(self.layers) - 1}."
        return [n for n, _ in self.named_parameters() if n.startswith((last, "post_norm."))]

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles [n, 3, T, T] -> features [n, (T/patch)², width] (HF ``hidden_states[-2]``)."""
        h = self.patch_embed(tiles).flatten(2).transpose(1, 2)
        if h.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(
                f"tiles of {tuple(tiles.shape[-2:])} pixels give {h.shape[1]} patches; "
                f"the position embedding holds {self.pos_embed.shape[0]}"
            )
        h = h + self.pos_embed
        for layer in self.layers[:-1]:
            # the tile count changes every batch: compiled layers (compile_model compiles each) keep one graph
            # for every count instead of compiling a static one first and recompiling when it changes
            torch._dynamo.maybe_mark_dynamic(h, 0)
            h = layer(h)
        return h
