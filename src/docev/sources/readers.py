"""Streaming readers for UFX sources: ``*.jsonl``, ``*.parquet`` and ``datasets`` ``save_to_disk`` folders
(and ``*.json`` arrays for sources of another ``formatting``, mapped by :mod:`docev.sources.formats`).

A source is split into *units* (file, first row, row count) that can be read independently, so
validation can fan out over processes and KFP tasks while each reader holds one chunk in memory
at a time. Every record carries its position (file, row, byte offset for jsonl) so it can be found
again, and a line that cannot be decoded is still yielded, with its error, so nothing is lost.

Parsing is bounded so that no single line can crash or starve a worker: a line's size is checked while
it is read (one longer than ``validate.max_line_bytes`` is skipped in 1 MiB pieces, never held whole, and
becomes a ``line_too_long`` record), and JSON nested deeper than :data:`MAX_JSON_DEPTH` is a ``too_deep``
record (the decoder's recursion is caught, and shallower documents are measured without recursion).
Rows are counted from 0 in the manifest (positions); messages for people say ``line N`` counting from 1.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from docev.config import DatasetSource
from docev.sources import formats
from docev.storage import Store, is_url, store_for, with_retries
from docev.vision.image_io import load_image

CHUNK_ROWS = 512
MAX_LINE_BYTES = 16 << 20  # validate.max_line_bytes' default
MAX_JSON_DEPTH = 32  # a UFX record is 4 levels deep (record > context > message > parts > part)
PREVIEW_BYTES = 1000  # what rejects.jsonl keeps of a line too long to keep whole (its position finds the rest)
_SKIP_PIECE = 1 << 20


@dataclass(frozen=True)
class Unit:
    """A contiguous range of rows in one file; ``offset`` is the byte offset of ``start`` (jsonl)."""

    source: str
    file: str
    start: int
    count: int
    offset: int = 0


@dataclass
class RawRecord:
    """One row as read: the mapped record, or the raw text and why it could not be parsed."""

    source: str
    file: str
    row: int
    offset: int | None
    data: dict[str, Any] | None
    raw: str | None = None
    error: tuple[str, ...] | None = None  # (reason code, detail[, field])
    original: dict[str, Any] | None = None  # the row as stored, for a source of another formatting (JSON-safe)
    fields: dict[str, str] | None = None  # UFX field prefix → the original field (formats.original_field)


def source_name(src: DatasetSource) -> str:
    return src.name or Path(src.source).name


def source_store(src: DatasetSource) -> Store:
    """The store of a source (local folder or fsspec URL), with its non-secret options."""
    return store_for(src.source, src.storage_options)


def allowed_stores(src: DatasetSource, allowed_roots: list[str]) -> list[Store]:
    """``validate.allowed_roots`` as stores; one on an object store is read with the source's options. The
    source's ``embedded_images_dir`` is one: its images were the rows' own bytes."""
    roots = [*allowed_roots, *([src.embedded_images_dir] if src.embedded_images_dir else [])]
    return [store_for(r, src.storage_options if is_url(r) else None) for r in roots]


def load_source_image(src: DatasetSource, name: str, allowed_roots: list[str]) -> Image.Image:
    """An accepted record's image, decoded as training decodes it (for reports, smoke prompts, preprocess)."""
    store = source_store(src)
    path = store.resolve(name, allowed_stores(src, allowed_roots))
    return load_image(io.BytesIO(store.read_bytes(path)), name=store.display(path))


def data_files(src: DatasetSource) -> list[tuple[str, str]]:
    """(kind, store path) of every data file of a source, in a stable order."""
    store = source_store(src)
    if not store.isdir():
        raise FileNotFoundError(f"UFX source {src.source}: not a folder")
    state = next((p for p in store.find("state.json") if posixpath.basename(p) == "state.json"), None)
    if state is not None:
        names = json.loads(store.read_bytes(state))["_data_files"]
        return [("arrow", posixpath.join(posixpath.dirname(state), f["filename"])) for f in names]
    files = [("jsonl", p) for p in store.find(".jsonl")]
    files += [("json", p) for p in store.find(".json")] if src.formatting != "ufx" else []
    files += [("parquet", p) for p in store.find(".parquet")]
    if not files:
        raise FileNotFoundError(f"UFX source {src.source}: no *.jsonl, *.parquet or save_to_disk dataset found")
    return files


def plan_units(src: DatasetSource, chunk_rows: int = CHUNK_ROWS, max_line_bytes: int = MAX_LINE_BYTES) -> list[Unit]:
    """Split a source into units by streaming through it once (line starts, row-group and batch sizes)."""
    name, units, store = source_name(src), [], source_store(src)
    for kind, path in data_files(src):
        rel = store.rel(path)
        if kind == "jsonl":
            with store.open_read(path) as fh:
                row, offset, start_row, start_off = 0, 0, 0, 0
                for _, size in bounded_lines(fh, max_line_bytes):
                    if row - start_row == chunk_rows:
                        units.append(Unit(name, rel, start_row, row - start_row, start_off))
                        start_row, start_off = row, offset
                    offset += size
                    row += 1
                if row > start_row:
                    units.append(Unit(name, rel, start_row, row - start_row, start_off))
        elif kind == "json":  # parsed whole: a JSON array has no row boundaries to seek to
            total = max(len(_json_rows(store, path)[0]), 1)  # an unreadable file is one reject
            units += [Unit(name, rel, s, min(chunk_rows, total - s)) for s in range(0, total, chunk_rows)]
        else:
            total = _table_rows(store, kind, path)
            units += [Unit(name, rel, s, min(chunk_rows, total - s)) for s in range(0, total, chunk_rows)]
    return units


def _table_rows(store: Store, kind: str, path: str) -> int:
    with _open_table(store, path) as fh:
        if kind == "parquet":
            return pq.ParquetFile(fh).metadata.num_rows
        return sum(batch.num_rows for batch in pa.ipc.open_stream(fh))


def _open_table(store: Store, path: str) -> Any:
    """Local files memory-mapped; objects through the retrying reader (parquet reads footer + row groups). A local
    open that fails transiently (EIO/ESTALE on an NFS or FUSE volume) is retried like any read."""
    if not store.local:
        return store.open_read(path)
    return with_retries(lambda: pa.memory_map(path), f"open {store.display(path)}", store.options)


_JSON_CACHE: dict[tuple[str, int], tuple[list[Any], str | None]] = {}


def _json_rows(store: Store, path: str) -> tuple[list[Any], str | None]:
    """(rows, parse error) of a ``.json`` file, kept for the file last read (its units are read in turn)."""
    key = (path, store.size(path))
    if key not in _JSON_CACHE:
        try:
            got: tuple[list[Any], str | None] = (formats.json_rows(store.read_bytes(path)), None)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
            got = ([], str(exc) or "JSON nested too deep to parse")
        _JSON_CACHE.clear()
        _JSON_CACHE[key] = got
    return _JSON_CACHE[key]


def _mapped(
    src: DatasetSource, unit: Unit, row: int, offset: int | None, data: dict[str, Any], text: str | None = None
) -> RawRecord:
    """A row as read → its record: UFX as it is (column names remapped), another formatting mapped into UFX
    with the original row and its field names kept, or that format's reject. A row nested deeper than any
    record can be is ``too_deep`` before anything recursive (the rules, pydantic, a mapping) sees it."""
    if json_depth_over(data, MAX_JSON_DEPTH):
        return _too_deep(unit, row, offset, text or "")  # a table row is found again by its position
    if src.formatting == "ufx":
        return RawRecord(unit.source, unit.file, row, offset, _remap(src, data))
    original = formats.json_safe(data)
    try:
        got = formats.to_ufx(data, src.formatting, where=f"{unit.file}:{row}", image_dir=src.embedded_images_dir)
    except formats.FormatError as exc:
        return RawRecord(unit.source, unit.file, row, offset, None, json.dumps(original), (exc.reason, exc.detail,
                         exc.field), original)  # fmt: skip
    return RawRecord(unit.source, unit.file, row, offset, got.record, original=original, fields=got.fields)


def _remap(src: DatasetSource, row: dict[str, Any]) -> dict[str, Any]:
    """Apply per-source column names: ``context_col`` → context (or text), ``image_files_col`` → image_files."""
    out = dict(row)
    target = "text" if src.ufx_type == "pretrain" else "context"
    if src.context_col != target and src.context_col in out:
        out[target] = out.pop(src.context_col)
    if src.image_files_col != "image_files" and src.image_files_col in out:
        out["image_files"] = out.pop(src.image_files_col)
    return out


def read_unit(src: DatasetSource, unit: Unit, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawRecord]:
    """Yield the unit's rows in order. Only this unit's rows are held in memory."""
    store = source_store(src)
    path = store.join(unit.file)
    if path.endswith(".jsonl"):
        yield from _read_jsonl(src, unit, store.open_read(path), max_line_bytes)
        return
    if path.endswith(".json"):
        rows, error = _json_rows(store, path)
        if error is not None:
            yield RawRecord(unit.source, unit.file, 0, None, None, None, ("invalid_json", error))
            return
        for i, row in enumerate(rows[unit.start : unit.start + unit.count], start=unit.start):
            if isinstance(row, dict):
                yield _mapped(src, unit, i, None, row)
            else:
                yield RawRecord(unit.source, unit.file, i, None, None, json.dumps(row),
                                ("wrong_type", f"a record is a JSON object, got {type(row).__name__}"))  # fmt: skip
        return
    for i, row in enumerate(_table_rows_slice(store, path, unit.start, unit.count)):
        yield _mapped(src, unit, unit.start + i, None, _drop_nulls(row))


def _drop_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """Arrow fills absent struct fields with None (e.g. ``text`` of image parts); UFX omits them."""
    out = {k: v for k, v in row.items() if v is not None}
    ctx = out.get("context")
    if isinstance(ctx, list):
        out["context"] = [
            {**m, "content": [{k: v for k, v in p.items() if v is not None} for p in m["content"]]}
            if isinstance(m, dict) and isinstance(m.get("content"), list)
            else m
            for m in ctx
        ]
    return out


def bounded_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, its size in bytes) of every line; the line is None when it is longer than ``limit`` bytes (its
    rest is read in 1 MiB pieces and dropped: memory stays bounded whatever one line holds)."""
    while line := fh.readline(limit + 1):
        size = len(line)
        if size <= limit or line.endswith(b"\n"):
            yield line, size
            continue
        while not line.endswith(b"\n") and (line := fh.readline(_SKIP_PIECE)):
            size += len(line)
        yield None, size


def json_depth_over(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests deeper than ``limit`` (measured with a stack, no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_line(src: DatasetSource, unit: Unit, row: int, pos: int, line: bytes) -> RawRecord:
    """One jsonl line as a record, or as its raw text with the reason it cannot be one (never raises)."""
    where = f"line {row + 1}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(unit.source, unit.file, row, pos, None, line.decode("utf-8", "replace"),
                         ("invalid_utf8", f"{where} byte {exc.start + 1}: {exc.reason}"))  # fmt: skip
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(unit.source, unit.file, row, pos, None, text.rstrip("\n"),
                         ("invalid_json", f"{where} col {exc.colno}: {exc.msg}"))  # fmt: skip
    except RecursionError:  # the decoder's own recursion limit (about 1,000 levels)
        return _too_deep(unit, row, pos, text)
    if not isinstance(data, dict):
        return RawRecord(unit.source, unit.file, row, pos, None, text.rstrip("\n"),
                         ("wrong_type", f"{where}: a record is a JSON object, got {type(data).__name__}"))  # fmt: skip
    return _mapped(src, unit, row, pos, data, text)


def _too_deep(unit: Unit, row: int, pos: int | None, text: str) -> RawRecord:
    return RawRecord(unit.source, unit.file, row, pos, None, text.rstrip("\n")[:PREVIEW_BYTES],
                     ("too_deep", f"line {row + 1}: JSON nested deeper than {MAX_JSON_DEPTH} levels"))  # fmt: skip


def _read_jsonl(src: DatasetSource, unit: Unit, fh: BinaryIO, max_line_bytes: int) -> Iterator[RawRecord]:
    with fh:
        fh.seek(unit.offset)
        offset = unit.offset
        lines = bounded_lines(fh, max_line_bytes)
        for i in range(unit.count):
            line, size = next(lines, (b"", 0))
            row, pos = unit.start + i, offset
            offset += size
            if line is None:
                fh.seek(pos)
                preview = fh.read(PREVIEW_BYTES).decode("utf-8", "replace") + " …"
                fh.seek(offset)
                yield RawRecord(unit.source, unit.file, row, pos, None, preview,
                                ("line_too_long", f"line {row + 1} is {size} bytes, over validate.max_line_bytes="
                                 f"{max_line_bytes} (not read past the limit)"))  # fmt: skip
                continue
            yield parse_line(src, unit, row, pos, line)


def _table_rows_slice(store: Store, path: str, start: int, count: int) -> Iterator[dict[str, Any]]:
    """Rows [start, start+count) of a parquet or Arrow-stream file, reading only the batches needed."""
    if path.endswith(".parquet"):
        with _open_table(store, path) as fh:
            yield from _parquet_slice(pq.ParquetFile(fh), start, count)
        return
    with _open_table(store, path) as mm:
        first = 0
        for batch in pa.ipc.open_stream(mm):
            n = batch.num_rows
            if first + n > start and first < start + count:
                lo, hi = max(start - first, 0), min(start + count - first, n)
                yield from batch.slice(lo, hi - lo).to_pylist()
            first += n
            if first >= start + count:
                return


def _parquet_slice(pf: pq.ParquetFile, start: int, count: int) -> Iterator[dict[str, Any]]:
    first = 0
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if first + n > start and first < start + count:
            table = pf.read_row_group(rg)
            lo, hi = max(start - first, 0), min(start + count - first, n)
            yield from table.slice(lo, hi - lo).to_pylist()
        first += n


def read_at(
    src: DatasetSource, file: str, row: int, offset: int | None, max_line_bytes: int = MAX_LINE_BYTES
) -> RawRecord:
    """Read one record back from its position (used for duplicates found at merge time)."""
    unit = Unit(source_name(src), file, row, 1, offset or 0)
    return next(read_unit(src, unit, max_line_bytes))
