"""Shard image formats: bytes per sample and loader samples/s, on three kinds of page.

Pages: the synthetic benchmark documents (``docev.synth``, PNG/JPEG, ≤ 1100 px), scanned-like pages
(A4 at 300 dpi = 2480×3508, paper tint, sensor noise, text lines, JPEG q85 as scanners write them)
and photos of receipts (12 MP phone photos, 3024×4032: a textured table, a tilted receipt, uneven
light, JPEG q90). All are generated here. Formats, each holding what the loader needs to rebuild the
transform's tiles (base tile + aspect-resized page, see ``docev.vision.tiling``):

- ``png``: today's shards: PNG (compress_level 1) of the resized page and of the base tile;
- ``original``: the original encoded bytes + the tiling plan; decode + resize at load time;
- ``webp_lossless``: lossless WebP of the resized page and the base tile;
- ``raw-zstd``: raw uint8 pixels of both in an Arrow IPC file with zstd compression;
- ``auto`` (the default chosen from this table): per image the smaller of ``original`` and ``webp_lossless``.

Per format: bytes/sample against the original images' bytes (target ≤ 1.5×), whether the loader's
pixels equal the transform's (lossless formats must), and samples per CPU-second of one process
turning a stored row into the uint8 tile tensor the collate batches (CPU time, so a shared machine
does not skew it), against what one H200 consumes at the preview (~1.5 pages/s; target ≥ 10×).

    .venv/bin/python benchmarks/shard_formats.py [--synthetic 40] [--scans 4] [--receipts 4] [--tile-size 560]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw, ImageFilter

from docev.data.shards import IMAGE_TYPE, ROWS_PER_BATCH, Tiling, image_row, stored_image
from docev.synth import synth_data
from docev.vision.image_io import load_image
from docev.vision.tiling import TiledImage

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


def _raw_row(tiled: TiledImage) -> dict:
    """``raw-zstd``: the tiles' uint8 pixels as they are (the Arrow file is zstd-compressed)."""
    return {"original": b"", "base": tiled.base.tobytes(), "resized": tiled.resized.tobytes()}


def _raw_decode(row: dict, tiled: TiledImage) -> TiledImage:
    (rh, rw), t = tiled.plan.resized, tiled.base.size
    return TiledImage(
        tiled.plan, Image.frombytes("RGB", t, row["base"]), Image.frombytes("RGB", (rw, rh), row["resized"])
    )


def _arrow_file(rows: list[dict], compression: str | None) -> bytes:
    """The rows as an Arrow IPC file (one image struct per row, 32 rows per batch, as the shards)."""
    table = pa.table({"image": pa.array(rows, type=IMAGE_TYPE)})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as writer:
        for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
            writer.write_batch(batch)
    return sink.getvalue()


def measure(fmt: str, originals: list[bytes], tiling: Tiling) -> dict[str, float]:
    """Bytes/sample of the shard file, pixel identity, and samples per CPU-second of stored row → uint8 tiles
    (the shards' own ``image_row`` / ``stored_image`` for every format but raw-zstd)."""
    tiled = [tiling.tile(load_image(io.BytesIO(o))) for o in originals]
    if fmt == "raw-zstd":
        rows = [_raw_row(t) for t in tiled]
    else:
        rows = [image_row(t, fmt, 95, o) for t, o in zip(tiled, originals, strict=True)]
    blob = _arrow_file(rows, "zstd" if fmt == "raw-zstd" else None)
    reader = pa.ipc.open_file(pa.BufferReader(blob))
    got, kept = [], 0
    start = time.process_time()
    for b in range(reader.num_record_batches):
        for k, row in enumerate(reader.get_batch(b).column("image").to_pylist()):
            i = b * ROWS_PER_BATCH + k
            image = _raw_decode(row, tiled[i]) if fmt == "raw-zstd" else stored_image(row, tiling)
            got.append(image.pixels(tiling.tile_size))
            kept += bool(row["original"])
    rate = len(originals) / (time.process_time() - start)
    identical = all(torch.equal(g, t.pixels(tiling.tile_size)) for g, t in zip(got, tiled, strict=True))
    return {"bytes": len(blob) / len(originals), "rate": rate, "identical": identical, "originals": kept}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=int, default=40)
    ap.add_argument("--scans", type=int, default=4)
    ap.add_argument("--receipts", type=int, default=4)
    ap.add_argument("--tile-size", type=int, default=560)
    ap.add_argument("--max-tiles", type=int, default=9)
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

    tiling = Tiling(args.tile_size, 1, args.max_tiles, int(RESAMPLE))

    target = 10 * H200_PAGES_PER_S
    print(f"tile {args.tile_size}, ≤{args.max_tiles} tiles; loader target ≥ {target:.0f} samples/s per process "
          f"(10 × {H200_PAGES_PER_S} pages/s per H200); bytes target ≤ 1.5× original")  # fmt: skip
    print(f"{'pages':16} {'format':14} {'bytes/sample':>13} {'× original':>10} {'samples/s':>10} {'× H200':>7} "
          f"{'pixels = transform':>18}")  # fmt: skip
    for kind, originals in pages.items():
        original = sum(len(o) for o in originals) / len(originals)
        print(f"{kind:16} {'(original)':14} {original:13,.0f} {1.0:10.2f}")
        for name in ("png", "original", "webp_lossless", "raw-zstd", "auto"):
            m = measure(name, originals, tiling)
            note = f"  ({m['originals']}/{len(originals)} kept as original)" if name == "auto" else ""
            print(f"{kind:16} {name:14} {m['bytes']:13,.0f} {m['bytes'] / original:10.2f} {m['rate']:10.1f} "
                  f"{m['rate'] / H200_PAGES_PER_S:7.1f} {'yes' if m['identical'] else 'NO':>18}{note}")  # fmt: skip


if __name__ == "__main__":
    main()
