"""The shard format: Arrow IPC files, one row per sample, readable by any Arrow library.

Why Arrow IPC (file format): it is memory-mappable, a row is found in O(1) (fixed rows per record
batch → batch index → slice), pyarrow/polars/DuckDB read it without this project, and columns can
be read alone (the sampler reads only the length columns of millions of rows). Images are stored
as encoded bytes (PNG by default: lossless, so shards reproduce the online transform exactly) of
the aspect-resized page *without* its padding plus the base tile; the canvas is rebuilt by pasting
into zeros, which is cheaper to store than the padded canvas and never a float tensor.

Columns: ``id``, ``source``, ``source_index``, ``tokens`` (int32, ONE ``<image>`` placeholder per
image), ``loss_mask`` (bool), ``len_r{R}`` (int32, sequence length at sampling ratio R, placeholders
expanded), ``images`` (list of struct: ``base`` / ``resized`` bytes, original ``height``/``width``,
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

from docev.vision.geometry import TilePlan
from docev.vision.tiling import TiledImage

ROWS_PER_BATCH = 32
IMAGE_TYPE = pa.struct([
    ("base", pa.binary()), ("resized", pa.binary()),
    ("height", pa.int32()), ("width", pa.int32()),
    ("canvas_h", pa.int32()), ("canvas_w", pa.int32()),
    ("resized_h", pa.int32()), ("resized_w", pa.int32()),
    ("rows", pa.int8()), ("cols", pa.int8()),
])  # fmt: skip


class ShardError(RuntimeError):
    """A shard that is missing, corrupt or built with another config."""


def schema(ratios: list[int]) -> pa.Schema:
    fields = [("id", pa.string()), ("source", pa.string()), ("source_index", pa.int16()),
              ("tokens", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_()))]  # fmt: skip
    fields += [(f"len_r{r}", pa.int32()) for r in sorted(ratios)]
    fields.append(("images", pa.list_(IMAGE_TYPE)))
    return pa.schema(fields)


def encode_image(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, "PNG", compress_level=1)
    elif fmt == "jpeg":
        image.save(buf, "JPEG", quality=quality, subsampling=0)
    else:
        image.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def image_row(tiled: TiledImage, fmt: str, quality: int) -> dict[str, Any]:
    """A tiled image as stored: the aspect-resized image (the canvas without its padding) and the base tile."""
    p = tiled.plan
    return {
        "base": encode_image(tiled.base, fmt, quality), "resized": encode_image(tiled.resized, fmt, quality),
        "height": p.size[0], "width": p.size[1], "canvas_h": p.canvas[0], "canvas_w": p.canvas[1],
        "resized_h": p.resized[0], "resized_w": p.resized[1], "rows": p.grid[0], "cols": p.grid[1],
    }  # fmt: skip


def stored_image(image: dict[str, Any]) -> TiledImage:
    """A stored image decoded back to the transform's :class:`TiledImage` (same pixels, PNG is lossless)."""
    plan = TilePlan(size=(image["height"], image["width"]), canvas=(image["canvas_h"], image["canvas_w"]),
                    resized=(image["resized_h"], image["resized_w"]), grid=(image["rows"], image["cols"]))  # fmt: skip
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


def write_shard(path: Path, rows: list[dict[str, Any]], ratios: list[int]) -> tuple[str, int]:
    """Write rows to ``path`` atomically (temp name, fsync, reopen and count, rename). Returns (sha256, rows)."""
    tmp = path.with_name(f".{path.name}.tmp")
    table = pa.Table.from_pylist(rows, schema=schema(ratios))
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=ROWS_PER_BATCH):
            writer.write_batch(batch)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    with pa.memory_map(str(tmp)) as mm:
        if pa.ipc.open_file(mm).read_all().num_rows != len(rows):
            raise ShardError(f"{tmp}: wrote {len(rows)} rows but read back a different count")
    digest = sha256_file(tmp)
    os.replace(tmp, path)
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
