"""The shard format: Arrow IPC files, one row per sample, readable by any Arrow library.

Why Arrow IPC (file format): it is memory-mappable, a row is found in O(1) (fixed rows per record
batch → batch index → slice), pyarrow/polars/DuckDB read it without this project, and columns can
be read alone (the sampler reads only the length columns of millions of rows). Images are stored
either as their original encoded bytes plus the tiling plan (tiled again at load time) or as encoded
bytes of the aspect-resized page *without* its padding plus the base tile; the canvas is rebuilt by
pasting into zeros, which is cheaper to store than the padded canvas and never a float tensor. The
default ``auto`` keeps per image the original unless its lossless WebP tiles come out smaller (at libwebp's
fastest effort for pages that shrink to a quarter of their pixels or less), so shards cost at most what the
images cost and reproduce the online transform exactly (see docs/architecture.md).

Columns: ``id``, ``source``, ``source_index``, ``tokens`` (int32, ONE ``<image>`` placeholder per
image), ``loss_mask`` (bool), ``len_r{R}`` (int32, sequence length at sampling ratio R, placeholders
expanded), ``images`` (list of struct: ``original`` bytes, or ``base`` / ``resized`` bytes, the image's
``height``/``width``,
``canvas_h``/``canvas_w``, ``resized_h``/``resized_w``, ``rows``/``cols``).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from docev.run.publish import publish, temp_name
from docev.vision.geometry import TilePlan
from docev.vision.image_io import load_image
from docev.vision.tiling import TiledImage, tile_image

ROWS_PER_BATCH = 32
FAST_SHRINK = 4  # see auto_encodings
# Length histograms (validate's per-source stats and the shard manifest) count tokens in these buckets.
TOKEN_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
IMAGE_TYPE = pa.struct([
    ("original", pa.binary()), ("base", pa.binary()), ("resized", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("canvas_h", pa.int32()), ("canvas_w", pa.int32()),
    ("resized_h", pa.int32()), ("resized_w", pa.int32()),
    ("rows", pa.int8()), ("cols", pa.int8()),
])  # fmt: skip


def bucket(value: int, edges: tuple[int, ...]) -> str:
    """Label of the first edge ``value`` is below (``<512``), or ``>=last``."""
    for edge in edges:
        if value < edge:
            return f"<{edge}"
    return f">={edges[-1]}"


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or built with another config."""


def schema(ratios: list[int]) -> pa.Schema:
    fields = [("id", pa.string()), ("source", pa.string()), ("source_index", pa.int16()),
              ("tokens", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_()))]  # fmt: skip
    fields += [(f"len_r{r}", pa.int32()) for r in sorted(ratios)]
    fields.append(("images", pa.list_(IMAGE_TYPE)))
    return pa.schema(fields)


@dataclass(frozen=True)
class Tiling:
    """What rebuilds the tiles of an image stored as its original bytes (recorded in ``manifest.json``)."""

    tile_size: int
    min_num_tiles: int
    max_num_tiles: int
    resample: int

    def tile(self, image: Image.Image) -> TiledImage:
        return tile_image(image, tile_size=self.tile_size, min_num_tiles=self.min_num_tiles,
                          max_num_tiles=self.max_num_tiles, resample=Image.Resampling(self.resample))  # fmt: skip


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buf, "JPEG", quality=quality, subsampling=0)
    elif fmt == "webp_lossless":  # effort 30 / method 1: within 2% of the smallest, several times faster to write
        image.save(buf, "WEBP", lossless=True, quality=30, method=1)
    elif fmt == "webp_lossless_fast":  # libwebp's fastest lossless effort: ~3.5x faster, ~1.8x the bytes of method 1
        image.save(buf, "WEBP", lossless=True, quality=0, method=0)
    else:
        image.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def auto_encodings(plan: TilePlan, tile_size: int) -> tuple[str, ...]:
    """The lossless encodings ``auto`` tries in turn, keeping the first that comes out smaller than the original.
    A page whose tiles hold at most 1/``FAST_SHRINK`` of its pixels is tried at the fastest effort first: shrunk
    that far its tiles are a fraction of the original's bytes even so (``benchmarks/preprocess_throughput.py``
    measures the bytes and the rate), and the slower, smaller code is the fallback where they are not."""
    (h, w), (rh, rw) = plan.size, plan.resized
    if FAST_SHRINK * (tile_size * tile_size + rh * rw) <= h * w:
        return ("webp_lossless_fast", "webp_lossless")
    return ("webp_lossless",)


def stores_original(fmt: str, plan: TilePlan, tile_size: int, original_bytes: int) -> bool:
    """Whether an image is stored as its original bytes, decided from its size alone (no decode, no encode):
    always for ``original``; for ``auto`` when the original is compressed (under a byte per pixel) and its tiles
    hold at least as many pixels as it does (the page is kept or enlarged, plus the base tile). A lossless code
    of an enlarged copy does not come out smaller than the page's own code, so encoding the tiles to compare
    would keep the original anyway; ``benchmarks/preprocess_throughput.py`` checks the two agree on its pages.
    Otherwise :func:`image_row` encodes the tiles and keeps the smaller."""
    if fmt == "original":
        return True
    (h, w), (rh, rw) = plan.size, plan.resized
    return fmt == "auto" and original_bytes < h * w and tile_size * tile_size + rh * rw >= h * w


def original_row(plan: TilePlan, original: bytes) -> dict[str, Any]:
    """An image stored as its original encoded bytes, with the plan that tiles it again at load time."""
    return {
        "original": original, "base": b"", "resized": b"",
        "height": plan.size[0], "width": plan.size[1], "canvas_h": plan.canvas[0], "canvas_w": plan.canvas[1],
        "resized_h": plan.resized[0], "resized_w": plan.resized[1], "rows": plan.grid[0], "cols": plan.grid[1],
    }  # fmt: skip


def image_row(tiled: TiledImage, fmt: str, quality: int, original: bytes) -> dict[str, Any]:
    """A tiled image as stored: its ``original`` encoded bytes (tiled again at load time), or the aspect-resized
    image (the canvas without its padding) and the base tile. ``auto`` keeps the tiles in lossless WebP when they
    come out smaller than the original (:func:`auto_encodings`), else the original: small pages stay as they
    came, large scans and photos shrink to their tiles."""
    row = original_row(tiled.plan, original)
    if fmt == "original":
        return row
    for encoding in auto_encodings(tiled.plan, tiled.base.width) if fmt == "auto" else (fmt,):
        base, resized = encode_image(tiled.base, encoding, quality), encode_image(tiled.resized, encoding, quality)
        if fmt != "auto" or len(base) + len(resized) < len(original):
            return row | {"original": b"", "base": base, "resized": resized}
    return row


def stored_image(image: dict[str, Any], tiling: Tiling) -> TiledImage:
    """A stored image decoded back to the transform's :class:`TiledImage` (same pixels for the lossless formats:
    the original is decoded and tiled as the transform does, PNG and lossless WebP are exact)."""
    plan = TilePlan(size=(image["height"], image["width"]), canvas=(image["canvas_h"], image["canvas_w"]),
                    resized=(image["resized_h"], image["resized_w"]), grid=(image["rows"], image["cols"]))  # fmt: skip
    if image["original"]:
        tiled = tiling.tile(load_image(io.BytesIO(image["original"]), name="stored original"))
        if tiled.plan != plan:
            raise ShardError(f"stored original tiles as {tiled.plan}, the shard recorded {plan}: another tiling")
        return tiled
    base, resized = (Image.open(io.BytesIO(image[k])) for k in ("base", "resized"))
    base.load()
    resized.load()
    return TiledImage(plan, base.convert("RGB"), resized.convert("RGB"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offsets(lengths: list[int]) -> pa.Buffer:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ShardError(f"{offsets[-1]} bytes or items in one column of {ROWS_PER_BATCH} rows: over Arrow's 2 GiB")
    return pa.py_buffer(offsets.astype(np.int32))


def column(values: list[Any], type_: pa.DataType) -> pa.Array:
    """``values`` (no nulls) as an Arrow array of ``type_``, made from buffers: pyarrow's own conversion of Python
    values imports pandas to ask whether they are pandas objects, seconds at a preprocess task's first shard."""
    if pa.types.is_struct(type_):
        fields = [type_.field(i) for i in range(type_.num_fields)]
        return pa.StructArray.from_arrays([column([v[f.name] for v in values], f.type) for f in fields], fields=fields)
    if pa.types.is_list(type_):
        offsets = pa.Array.from_buffers(pa.int32(), len(values) + 1, [None, _offsets([len(v) for v in values])])
        return pa.ListArray.from_arrays(offsets, column([x for v in values for x in v], type_.value_type))
    if pa.types.is_string(type_) or pa.types.is_binary(type_):
        blobs = [v.encode() if isinstance(v, str) else v for v in values]
        return pa.Array.from_buffers(type_, len(values), [None, _offsets(list(map(len, blobs))),
                                                          pa.py_buffer(b"".join(blobs))])  # fmt: skip
    if pa.types.is_boolean(type_):
        data = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    else:
        data = np.asarray(values, dtype=np.dtype(str(type_)))  # int8 … int64
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(data)])


def write_shard(path: Path, rows: list[dict[str, Any]], ratios: list[int]) -> tuple[str, int]:
    """Write rows to ``path`` atomically (temp name, fsync, reopen and count, rename). Returns (sha256, rows)."""
    tmp = temp_name(path)
    shard_schema = schema(ratios)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, shard_schema) as writer:
        for start in range(0, len(rows), ROWS_PER_BATCH):
            chunk = rows[start : start + ROWS_PER_BATCH]
            columns = [column([row[f.name] for row in chunk], f.type) for f in shard_schema]
            writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=shard_schema))
    with pa.memory_map(str(tmp)) as mm:
        if pa.ipc.open_file(mm).read_all().num_rows != len(rows):
            raise ShardError(f"{tmp}: wrote {len(rows)} rows but read back a different count")
    digest = sha256_file(tmp)
    publish(tmp, path)
    return digest, len(rows)


@dataclass
class ShardFile:
    """Random access to one shard (opened lazily, once per process: safe across DataLoader workers)."""

    path: Path
    num_rows: int
    _reader: pa.ipc.RecordBatchFileReader | None = None
    _pid: int | None = None

    def reader(self) -> pa.ipc.RecordBatchFileReader:
        if self._reader is None or self._pid != os.getpid():
            self._reader = pa.ipc.open_file(pa.memory_map(str(self.path)))
            self._pid = os.getpid()
        return self._reader

    def row(self, i: int) -> dict[str, Any]:
        batch = self.reader().get_batch(i // ROWS_PER_BATCH)
        return batch.slice(i % ROWS_PER_BATCH, 1).to_pylist()[0]

    def column(self, name: str) -> np.ndarray:
        """One column of every row (the others are not touched)."""
        reader = self.reader()
        arrays = [reader.get_batch(b).column(name) for b in range(reader.num_record_batches)]
        return pa.concat_arrays(arrays).to_numpy() if arrays else np.zeros(0)
