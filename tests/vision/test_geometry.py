"""Geometry against transformers' LLaVA-NeXT (the reference implementation)."""

from types import SimpleNamespace

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution as hf_select
from transformers.models.llava_next.modeling_llava_next import unpad_image
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

from docev.vision.geometry import candidate_canvases, num_image_tokens, packed_grid, plan_tiles, unpad_shape

T, P = 560, 14
SIZES = [(1, 1), (14, 14), (100, 7000), (7000, 100), (560, 560), (559, 560), (561, 561), (1120, 560),
         (1121, 559), (1680, 1680), (3508, 2480), (2480, 3508), (842, 595), (1100, 300), (96, 220),
         (333, 1000), (4000, 3000)]  # fmt: skip


def _hf_tokens(h: int, w: int, ratio: int) -> int:
    pinpoints = [list(c) for c in candidate_canvases(T, 1, 9)]
    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints),
        patch_size=P * ratio,  # (T // P) // r == T // (P * r): the per-tile grid divided by r with floor
        num_additional_image_tokens=0,
    )
    fake._get_unpadded_features = lambda *a: LlavaNextProcessor._get_unpadded_features(fake, *a)
    return LlavaNextProcessor._get_number_of_features(fake, h, w, T, T)


@pytest.mark.parametrize("h, w", SIZES)
def test_best_canvas_matches_llava_next(h, w):
    cands = candidate_canvases(T, 1, 9)
    assert plan_tiles(h, w, T, 1, 9).canvas == tuple(hf_select([h, w], [list(c) for c in cands]))


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("ratio", [2, 3])
def test_token_count_matches_llava_next(h, w, ratio):
    assert num_image_tokens(h, w, ratio, tile_size=T, patch_size=P) == _hf_tokens(h, w, ratio)


def test_known_counts():
    # a square one-tile image: base 20x20 + 20 rows x 21 at r=2; 13x13 + 13x14 at r=3
    assert num_image_tokens(560, 560, 2, tile_size=T, patch_size=P) == 400 + 20 * 21
    assert num_image_tokens(560, 560, 3, tile_size=T, patch_size=P) == 169 + 13 * 14
    # a 9-tile page costs about 4k tokens at r=2 (DESIGN §4)
    assert 3500 < num_image_tokens(1680, 1680, 2, tile_size=T, patch_size=P) < 4500


@pytest.mark.parametrize("h, w", [(100, 7000), (842, 595), (1100, 300), (560, 561)])
def test_unpad_matches_llava_next(h, w):
    plan = plan_tiles(h, w, T, 1, 9)
    side = 20
    grid = torch.zeros(1, plan.grid[0] * side, plan.grid[1] * side)
    expected = unpad_image(grid, (h, w)).shape[1:]
    top, bottom, left, right = unpad_shape(h, w, *grid.shape[1:])
    assert (bottom - top, right - left) == tuple(expected) == packed_grid(h, w, plan.grid, side)
