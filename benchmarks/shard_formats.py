"""Shard image formats: bytes per sample and loader samples/s, on three kinds of page.

Pages: the synthetic benchmark documents (``docev.synth``, PNG/JPEG, ≤ 1100 px), scanned-like pages
(A4 at 300 dpi = 2480×3508, paper tint, sensor noise, text lines, JPEG q85 as scanners write them)
and photos of receipts (12 MP phone photos, 3024×4032: a textured table, a tilted receipt, uneven
light, JPEG q90). All are generated here. Formats, each holding what the loader needs to rebuild the
transform's tiles (base tile + aspect-resized page, see ``docev.vision.tiling``):

- ``png``: today's shards: PNG (compress_level 1) of the resized page and of the base tile;
- ``original``: the original encoded bytes + the tiling plan; decode + resize at load time;
- ``webp-lossless``: lossless WebP of the resized page and the base tile;
- ``raw-zstd``: raw uint8 pixels of both in an Arrow IPC file with zstd compression.

Per format: bytes/sample against the original images' bytes (target ≤ 1.5×), whether the loader's
pixels equal the transform's (lossless formats must), and samples per CPU-second of one process
turning a stored row into the uint8 tile tensor the collate batches (CPU time, so a shared machine
does not skew it), against what one H200 consumes at the preview (~1.5 pages/s; target ≥ 10×).

    .venv/bin/python benchmarks/shard_formats.py [--synthetic 40] [--scans 6] [--receipts 6] [--tile-size 560]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFilter

from docev.synth import synth_data
from docev.vision.image_io import load_image
from docev.vision.tiling import TiledImage, tile_image

H200_PAGES_PER_S = 1.5  # the preview's training rate per GPU (docs/architecture.md, training throughput)
RESAMPLE = Image.Resampling.BICUBIC


def scanned_page(rng: np.random.Generator) -> bytes:
    """An A4 page at 300 dpi as a flatbed scanner writes it: tinted paper, noise, text lines, JPEG q85."""
    w, h = 2480, 3508
    page = Image.new("L", (w, h), int(rng.integers(232, 246)))
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(250, 350))
    while y < h - 300:
        x = 240
        while x < w - 400:
            word = int(rng.integers(60, 320))
            draw.rectangle([x, y, x + word, y + 34], fill=int(rng.integers(20, 70)))
            x += word + int(rng.integers(25, 45))
        y += int(rng.integers(58, 70)) + (140 if rng.random() < 0.08 else 0)
    page = page.filter(ImageFilter.GaussianBlur(1.2))
    pixels = np.asarray(page, dtype=np.float32) + rng.normal(0, 5, (h, w))
    tint = np.array([1.0, 0.985, 0.95], dtype=np.float32)
    rgb = np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def receipt_photo(rng: np.random.Generator) -> bytes:
    """A phone photo (3024×4032) of a receipt on a table: texture, tilt, uneven light, JPEG q90."""
    w, h = 3024, 4032
    grain = rng.normal(0, 1, (h // 8, w // 8)).astype(np.float32)
    table = Image.fromarray(np.clip(110 + 25 * grain, 0, 255).astype(np.uint8), "L").resize((w, h), RESAMPLE)
    table_rgb = np.asarray(table, dtype=np.float32)[..., None] * np.array([1.0, 0.8, 0.6], dtype=np.float32)
    photo = Image.fromarray(np.clip(table_rgb, 0, 255).astype(np.uint8), "RGB")
    rw, rh = 1300, 3300
    receipt = Image.new("L", (rw, rh), 240)
    draw = ImageDraw.Draw(receipt)
    for y in range(160, rh - 160, 72):
        draw.rectangle([90, y, 90 + int(rng.integers(300, 800)), y + 30], fill=50)
        draw.rectangle([rw - 330, y, rw - 110, y + 30], fill=50)
    receipt = receipt.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    mask = receipt.point(lambda v: 255 if v > 0 else 0)
    photo.paste(Image.merge("RGB", [receipt] * 3), ((w - receipt.width) // 2, (h - receipt.height) // 2), mask)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    light = 0.75 + 0.35 * np.exp(-(((xx - 0.6 * w) / w) ** 2 + ((yy - 0.3 * h) / h) ** 2) * 3)
    pixels = np.asarray(photo, dtype=np.float32) * light[..., None] + rng.normal(0, 3, (h, w, 1))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _webp(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "WEBP", lossless=True, quality=30, method=1)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB")


class Format:
    """encode(original bytes, tiled) → stored blobs; decode(blobs) → TiledImage."""

    def __init__(self, name: str, tile: Callable[[Image.Image], TiledImage]):
        self.name, self.tile = name, tile

    def encode(self, original: bytes, tiled: TiledImage) -> list[bytes]:
        if self.name == "original":
            return [original]
        if self.name == "png":
            return [_png(tiled.base), _png(tiled.resized)]
        if self.name == "webp-lossless":
            return [_webp(tiled.base), _webp(tiled.resized)]
        return [tiled.base.tobytes(), tiled.resized.tobytes()]

    def decode(self, blobs: list[bytes], tiled: TiledImage) -> TiledImage:
        if self.name == "original":
            return self.tile(load_image(io.BytesIO(blobs[0])))
        if self.name == "raw-zstd":
            (rh, rw), t = tiled.plan.resized, tiled.base.size
            return TiledImage(
                tiled.plan, Image.frombytes("RGB", t, blobs[0]), Image.frombytes("RGB", (rw, rh), blobs[1])
            )
        return TiledImage(tiled.plan, _decode(blobs[0]), _decode(blobs[1]))


def _arrow_file(rows: list[list[bytes]], compression: str | None) -> bytes:
    """The rows as an Arrow IPC file (one list<binary> column, 32 rows per batch, as the shards)."""
    table = pa.table({"images": pa.array(rows, type=pa.list_(pa.binary()))})
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_file(sink, table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=32):
            writer.write_batch(batch)
    return sink.getvalue()


def measure(fmt: Format, originals: list[bytes], tile_size: int, repeats: int) -> dict[str, float]:
    tiled = [fmt.tile(load_image(io.BytesIO(o))) for o in originals]
    rows = [fmt.encode(o, t) for o, t in zip(originals, tiled, strict=True)]
    blob = _arrow_file(rows, "zstd" if fmt.name == "raw-zstd" else None)
    reader = pa.ipc.open_file(pa.BufferReader(blob))
    identical = True
    start, n = time.process_time(), 0
    for _ in range(repeats):
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b).column("images").to_pylist()
            for k, stored in enumerate(batch):
                i = b * 32 + k
                got = fmt.decode(stored, tiled[i]).pixels(tile_size)
                n += 1
                if n <= len(originals):
                    identical &= bool((got == tiled[i].pixels(tile_size)).all())
    rate = n / (time.process_time() - start)
    return {"bytes": len(blob) / len(originals), "rate": rate, "identical": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=int, default=40)
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--receipts", type=int, default=6)
    ap.add_argument("--tile-size", type=int, default=560)
    ap.add_argument("--max-tiles", type=int, default=9)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = synth_data(Path(tmp), args.synthetic, seed=0, fmt="jsonl", workers=1)["instruct"]
        synthetic = [p.read_bytes() for p in sorted((root / "images").iterdir())]
    pages = {
        "synthetic": synthetic,
        "scan-a4-300dpi": [scanned_page(rng) for _ in range(args.scans)],
        "receipt-photo": [receipt_photo(rng) for _ in range(args.receipts)],
    }

    def tile(im: Image.Image) -> TiledImage:
        return tile_image(
            im, tile_size=args.tile_size, min_num_tiles=1, max_num_tiles=args.max_tiles, resample=RESAMPLE
        )

    target = 10 * H200_PAGES_PER_S
    print(f"tile {args.tile_size}, ≤{args.max_tiles} tiles; loader target ≥ {target:.0f} samples/s per process "
          f"(10 × {H200_PAGES_PER_S} pages/s per H200); bytes target ≤ 1.5× original")  # fmt: skip
    print(f"{'pages':16} {'format':14} {'bytes/sample':>13} {'× original':>10} {'samples/s':>10} {'× H200':>7} "
          f"{'pixels = transform':>18}")  # fmt: skip
    for kind, originals in pages.items():
        original = sum(len(o) for o in originals) / len(originals)
        print(f"{kind:16} {'(original)':14} {original:13,.0f} {1.0:10.2f}")
        for name in ("png", "original", "webp-lossless", "raw-zstd"):
            m = measure(Format(name, tile), originals, args.tile_size, args.repeats)
            print(f"{kind:16} {name:14} {m['bytes']:13,.0f} {m['bytes'] / original:10.2f} {m['rate']:10.1f} "
                  f"{m['rate'] / H200_PAGES_PER_S:7.1f} {'yes' if m['identical'] else 'NO':>18}")  # fmt: skip


if __name__ == "__main__":
    main()
