"""How preprocess decides an image's stored form: by size alone where that gives what encoding and comparing
would, else by encoding its tiles."""

import io

import pytest
import torch
from PIL import Image

from docev.data.shards import Tiling, auto_encodings, encode_image, image_row, stored_image, stores_original
from docev.vision.geometry import plan_tiles
from docev.vision.image_io import load_image
from docev.vision.tiling import tile_image


@pytest.mark.parametrize("tile_size", [112, 560])
def test_size_rule_agrees_with_encoding_and_comparing(synth_sources, tile_size):
    files = sorted(p for p in (synth_sources["instruct"] / "images").rglob("*") if p.is_file())
    decided = 0
    for f in files:
        blob = f.read_bytes()
        tiled = tile_image(load_image(io.BytesIO(blob)), tile_size=tile_size)
        if stores_original("auto", tiled.plan, tile_size, len(blob)):
            decided += 1
            assert image_row(tiled, "auto", 95, blob)["original"] == blob, f.name
    assert decided  # 560: pages are enlarged into their tiles; 112: only the small figures


def test_uncompressed_or_shrunk_images_are_encoded_to_decide():
    small = Image.new("RGB", (200, 100), (250, 250, 250))
    bmp, png = io.BytesIO(), io.BytesIO()
    small.save(bmp, "BMP")
    small.save(png, "PNG")
    enlarged = plan_tiles(100, 200, 112, 1, 9)  # fits its tiles whole: more tile pixels than image pixels
    assert stores_original("auto", enlarged, 112, len(png.getvalue()))
    assert not stores_original("auto", enlarged, 112, len(bmp.getvalue()))  # 3 bytes a pixel: WebP may win
    shrunk = plan_tiles(3000, 2000, 112, 1, 9)
    assert not stores_original("auto", shrunk, 112, 10_000)
    assert stores_original("original", shrunk, 112, 10**9)
    assert not any(stores_original(fmt, enlarged, 112, 10) for fmt in ("png", "jpeg", "webp"))


def test_pages_shrunk_to_a_quarter_try_the_fast_effort_first_and_stay_exact():
    page = Image.merge("RGB", [Image.linear_gradient("L").resize((1200, 1600)), Image.effect_noise((1200, 1600), 30),
                               Image.new("L", (1200, 1600), 200)])  # fmt: skip
    tiled = tile_image(page, tile_size=112)  # ~30 times fewer pixels in the tiles than in the page
    assert auto_encodings(tiled.plan, 112) == ("webp_lossless_fast", "webp_lossless")
    assert auto_encodings(tile_image(page, tile_size=448).plan, 448) == ("webp_lossless",)  # shrunk ~2x
    fast, small = ([encode_image(im, enc, 95) for im in (tiled.base, tiled.resized)]
                   for enc in ("webp_lossless_fast", "webp_lossless"))  # fmt: skip
    assert sum(map(len, small)) < sum(map(len, fast))
    row = image_row(tiled, "auto", 95, b"x" * (sum(map(len, fast)) + 1))
    assert [row["base"], row["resized"]] == fast and not row["original"]
    back = stored_image(row, Tiling(112, 1, 9, int(Image.Resampling.BICUBIC)))
    assert back.plan == tiled.plan and torch.equal(back.pixels(112), tiled.pixels(112))  # lossless: exact
    row = image_row(tiled, "auto", 95, b"x" * sum(map(len, fast)))  # the fast code no smaller: the smaller code
    assert [row["base"], row["resized"]] == small
    assert image_row(tiled, "auto", 95, b"x" * sum(map(len, small)))["original"]  # neither smaller: the original
