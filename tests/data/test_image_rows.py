"""How preprocess decides an image's stored form: by size alone where that gives what encoding and comparing
would, else by encoding its tiles."""

import io

import pytest
from PIL import Image

from docev.data.shards import image_row, stores_original
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
