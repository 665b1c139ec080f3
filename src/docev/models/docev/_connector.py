"""LDPv2 connector: project each tile's features, pool them by the sampling ratio, add a PEG.

``avg_pool2d`` uses floor semantics (ratio 3 on a 40×40 grid gives 13×13 and drops the last
row/column): the released model was trained with exactly this, and the token counter
(``docev.vision.geometry.pooled_side``) assumes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LDPv2Connector(nn.Module):
    """MLP (Linear→GELU→Linear) per token, reshape to the patch grid, ``avg_pool2d(k=s=ratio)``,
    then a depthwise 3×3 convolution added as a residual (positional encoding generator).

    Args:
        mlp (nn.Module): vision width -> decoder width.
        peg (nn.Conv2d): depthwise (groups = decoder width), 3×3, padding 1, with bias.
        grid (int): patches per tile side (tile_size // patch_size).
    """

    def __init__(self, mlp: nn.Module, peg: nn.Conv2d, grid: int):
        super().__init__()
        self.mlp = mlp
        self.peg = peg
        self.grid = grid

    def forward(self, x: torch.Tensor, ratio: int) -> torch.Tensor:
        """x [n, grid², width] -> [n, s, s, dim] with s = grid // ratio."""
        if not 1 <= ratio <= self.grid:
            raise ValueError(f"sampling_ratio {ratio} outside 1..{self.grid} (the per-tile patch grid side)")
        n = x.shape[0]
        h = self.mlp(x).view(n, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        h = F.avg_pool2d(h, kernel_size=ratio, stride=ratio)
        h = h + self.peg(h)
        return h.permute(0, 2, 3, 1)
