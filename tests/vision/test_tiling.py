"""Pixels against transformers' ``LlavaNextImageProcessorPil`` (the PIL LLaVA-NeXT reference) at tile 560."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from docev.vision.geometry import candidate_canvases, plan_tiles
from docev.vision.tiling import PixelConfig, cut_tiles, normalize, tile_image, to_chw

T = 560
# 1x1, 14x14, extreme aspect ratios, exact tile multiples and ±1 around them, A4 at 300 dpi both ways,
# and the synthetic page shapes (A4 at 72 dpi, receipt, crop).
SIZES = [(1, 1), (14, 14), (100, 7000), (7000, 100), (560, 560), (559, 559), (561, 561), (560, 1120),
         (559, 1121), (1121, 559), (1680, 1680), (1679, 1681), (3508, 2480), (2480, 3508), (842, 595),
         (1100, 300), (96, 220)]  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    pinpoints = [list(c) for c in candidate_canvases(T, 1, 9)]
    return LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints, size={"height": T, "width": T}, crop_size={"height": T, "width": T},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=Image.Resampling.BICUBIC, do_pad=False,
    )  # fmt: skip


def _page(h: int, w: int, seed: int) -> Image.Image:
    """Noise over gradients: every resampling difference shows up."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * 255 // max(h - 1, 1)), (xx * 255 // max(w - 1, 1)), ((yy + xx) % 256)], axis=-1)
    noise = rng.integers(-40, 41, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("h, w", SIZES)
def test_matches_llava_next_processor(reference, h, w):
    image = _page(h, w, seed=h * 7919 + w)
    expected = reference(image, return_tensors="np")["pixel_values"][0]
    tiled = tile_image(image, tile_size=T)
    pixels = tiled.pixels(T)
    assert pixels.dtype == torch.uint8
    assert tiled.plan == plan_tiles(h, w, T, 1, 9)
    assert pixels.shape == (tiled.plan.num_tiles, 3, T, T) == expected.shape
    # uint8 pixels are identical (same PIL filter, same zero padding), so the normalised values agree to
    # float32 rounding: the tolerance achieved is 1e-6 (|x| <= 1).
    ours = normalize(pixels).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)
    ref_uint8 = np.rint((expected * 0.5 + 0.5) * 255).astype(np.uint8)
    assert np.array_equal(pixels.numpy(), ref_uint8)


def test_canvas_is_centred_with_zero_padding():
    image = Image.new("RGB", (300, 1100), (200, 100, 50))  # (w, h): a receipt
    tiled = tile_image(image, tile_size=T)
    (ch, cw), rw = tiled.plan.canvas, tiled.plan.resized[1]
    canvas = to_chw(tiled.canvas)
    assert canvas.shape == (3, ch, cw) and rw < cw
    left = (cw - rw) // 2
    assert canvas[:, :, :left].sum() == 0 and canvas[:, :, left + rw :].sum() == 0
    assert torch.equal(canvas[:, ch // 2, left + rw // 2], torch.tensor([200, 100, 50], dtype=torch.uint8))
    assert tiled.base.size == (T, T)
    # the fast path of pixels() equals cutting the padded canvas (what a loader does with a stored canvas)
    assert torch.equal(tiled.pixels(T), torch.cat([to_chw(tiled.base)[None], cut_tiles(canvas, T)]))
    with pytest.raises(ValueError, match="another tile size"):
        tiled.pixels(112)


def test_cut_tiles_row_major():
    rows, cols, t = 2, 3, 4
    ids = torch.arange(rows * cols, dtype=torch.uint8).view(rows, cols)
    canvas = ids.repeat_interleave(t, 0).repeat_interleave(t, 1)[None].repeat(3, 1, 1)
    tiles = cut_tiles(canvas, t)
    assert tiles.shape == (rows * cols, 3, t, t)
    assert [int(x[0, 0, 0]) for x in tiles] == list(range(rows * cols))
    assert all(bool((x == x[0, 0, 0]).all()) for x in tiles)
    with pytest.raises(ValueError, match="not a multiple"):
        cut_tiles(canvas[:, :, :-1], t)


def test_normalize_values_and_dtype():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1)
    y = normalize(x, mean=(0.5, 0.5, 0.2), std=(0.5, 0.25, 0.1), dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float().flatten(), torch.tensor([-1.0, 2.0, 0.0]), atol=1e-2)
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float())


def test_pixel_config_from_checkpoint(tmp_path, tiny_checkpoint):
    assert PixelConfig.from_checkpoint(tiny_checkpoint) == PixelConfig()
    assert PixelConfig.from_checkpoint(tmp_path) == PixelConfig((0.5,) * 3, (0.5,) * 3, Image.Resampling.BICUBIC)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27], "resample": 2})
    )
    cfg = PixelConfig.from_checkpoint(tmp_path)
    assert cfg.mean == (0.48, 0.45, 0.4) and cfg.resample == Image.Resampling.BILINEAR
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.5, 0.0, 0.5]}))
    with pytest.raises(ValueError, match="preprocessor_config.json: image_mean/image_std"):
        PixelConfig.from_checkpoint(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"resample": 42}))
    with pytest.raises(ValueError, match="not a PIL filter"):
        PixelConfig.from_checkpoint(tmp_path)


def test_resample_filter_is_used():
    image = _page(300, 500, seed=1)
    bicubic = tile_image(image, tile_size=112).pixels(112)
    nearest = tile_image(image, tile_size=112, resample=Image.Resampling.NEAREST).pixels(112)
    assert bicubic.shape == nearest.shape and not torch.equal(bicubic, nearest)


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB"):
        tile_image(Image.new("L", (20, 20)), tile_size=112)
