"""Anyres tiling geometry and exact image token counts (pure arithmetic, no pixels).

Shared by the transform (tiling), the validator (token counts from image headers), the
preprocessor and the model (LLaVA-NeXT unpad), so the count of ``<image>`` tokens written
into a sequence and the number of features the model produces come from one formula.
The reference is transformers' LLaVA-NeXT (``select_best_resolution``, ``unpad_image``,
``LlavaNextProcessor._get_unpadded_features``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=64)
def candidate_canvases(tile_size: int, min_num_tiles: int, max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows·tile, cols·tile) canvas with min ≤ rows·cols ≤ max, as (height, width)."""
    return tuple(
        (i * tile_size, j * tile_size)
        for i in range(1, max_num_tiles + 1)
        for j in range(1, max_num_tiles + 1)
        if min_num_tiles <= i * j <= max_num_tiles
    )


def select_best_resolution(height: int, width: int, candidates: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """LLaVA-NeXT's choice: maximise effective resolution, then minimise wasted canvas."""
    best, best_eff, best_waste = candidates[0], -1, math.inf
    for ch, cw in candidates:
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ch * cw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ch, cw), eff, waste
    return best


def resized_size(height: int, width: int, canvas: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size inside the canvas (transformers' ``get_patch_output_size``)."""
    ch, cw = canvas
    scale_w, scale_h = cw / width, ch / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), ch), cw
    return ch, min(math.ceil(width * scale_h), cw)


def unpad_shape(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """LLaVA-NeXT ``unpad_image`` on a (cur_h, cur_w) feature grid of an image of the original size:
    returns (top, bottom, left, right) so the kept grid is ``[top:bottom, left:right]``."""
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


@dataclass(frozen=True)
class TilePlan:
    """Where an image of ``size`` (h, w) goes: canvas, resized size inside it, tile grid (rows, cols)."""

    size: tuple[int, int]
    canvas: tuple[int, int]
    resized: tuple[int, int]
    grid: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        """Tiles fed to the vision tower: the base tile plus the grid."""
        return 1 + self.grid[0] * self.grid[1]


def plan_tiles(height: int, width: int, tile_size: int, min_num_tiles: int, max_num_tiles: int) -> TilePlan:
    canvas = select_best_resolution(height, width, candidate_canvases(tile_size, min_num_tiles, max_num_tiles))
    return TilePlan(
        size=(height, width),
        canvas=canvas,
        resized=resized_size(height, width, canvas),
        grid=(canvas[0] // tile_size, canvas[1] // tile_size),
    )


def pooled_side(tile_size: int, patch_size: int, ratio: int) -> int:
    """Side of a tile's feature grid after ``avg_pool2d(kernel=stride=ratio)`` (floor)."""
    return (tile_size // patch_size) // ratio


def packed_grid(height: int, width: int, grid: tuple[int, int], side: int) -> tuple[int, int]:
    """(rows, cols) of the unpadded grid features; each row gets one ``image_newline`` appended."""
    top, bottom, left, right = unpad_shape(height, width, grid[0] * side, grid[1] * side)
    return bottom - top, right - left


def num_image_tokens(
    height: int,
    width: int,
    ratio: int,
    *,
    tile_size: int,
    patch_size: int,
    min_num_tiles: int = 1,
    max_num_tiles: int = 9,
) -> int:
    """Tokens one image costs: base tile s² + unpadded rows × (cols + 1)."""
    plan = plan_tiles(height, width, tile_size, min_num_tiles, max_num_tiles)
    s = pooled_side(tile_size, patch_size, ratio)
    rows, cols = packed_grid(height, width, plan.grid, s)
    return s * s + rows * (cols + 1)
