"""Source fingerprints: what identified each data file and each accepted image when validate read it.

Preprocess reads records back by (file, row, byte offset) and images by name, trusting that they are
the bytes validate checked. A record edited in place, an image replaced, a record appended or a file
reordered used to be preprocessed silently (or crash naming nothing). Validate now records, per data
file, its size, its modification time (local) or ETag / version id (object stores) and an XXH3-128
of its content (``validate/sources.json``), and per accepted image the size and XXH3-128 of the bytes
it decoded (in the manifest entry). Preprocess checks the data files before it reads a record and
each image's bytes as it reads them, and refuses with ``source changed since validate: FILE — run
validate again``. The content hash decides: a file copied back with a new mtime but the same bytes is
unchanged; a changed ETag or version id on an object store is a change.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import xxhash

from docev.storage import Store, with_retries

HASH = "xxh3_128"
_STORE_IDS = ("VersionId", "ETag")  # s3fs's info keys, strongest first


class SourceChanged(RuntimeError):
    """A source file or image differs from what validate read."""

    def __init__(self, where: str, what: str):
        self.where, self.what = where, what
        super().__init__(f"source changed since validate: {where} — run validate again ({what})")


def of_bytes(data: bytes) -> dict[str, Any]:
    """The fingerprint of bytes in hand (an image validate or preprocess already read)."""
    return {"bytes": len(data), HASH: xxhash.xxh3_128_hexdigest(data)}


def of_file(store: Store, path: str) -> dict[str, Any]:
    """Size, mtime (local) or ETag / version id (object store), and the content hash of a data file."""
    store.fs.invalidate_cache(path)  # an object store's listing cache would answer with the old ETag
    info = with_retries(lambda: store.fs.info(path), f"stat {store.display(path)}", store.options)
    out: dict[str, Any] = {"bytes": int(info["size"])}
    if store.local:
        out["mtime"] = info.get("mtime")
    else:
        out.update({k: info[k] for k in _STORE_IDS if info.get(k)})
    h = xxhash.xxh3_128()

    def read() -> None:
        h.reset()
        with store.fs.open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 << 20), b""):
                h.update(chunk)

    with_retries(read, f"read {store.display(path)}", store.options)
    out[HASH] = h.hexdigest()
    return out


def difference(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """What differs between two fingerprints (None when the content is the same)."""
    for key in _STORE_IDS:  # an object store's own identity of the content
        if key in recorded and key in now and recorded[key] != now[key]:
            return f"{key} {recorded[key]} at validate, now {now[key]}"
    if recorded["bytes"] != now["bytes"]:
        return f"{recorded['bytes']} bytes at validate, now {now['bytes']}"
    if recorded[HASH] != now[HASH]:
        return f"same size, other content ({HASH} {recorded[HASH][:12]}… at validate, now {now[HASH][:12]}…)"
    return None


def check_bytes(where: str, recorded: Mapping[str, Any] | None, data: bytes) -> None:
    """Refuse bytes read for an image whose fingerprint validate recorded, when they differ."""
    if recorded is not None and (what := difference(recorded, of_bytes(data))):
        raise SourceChanged(where, what)


def check_files(stores: Mapping[str, Store], recorded: Mapping[str, Mapping[str, Any]]) -> int:
    """Check every data file of ``validate/sources.json`` (``{source: {relative file: fingerprint}}``) against
    its store now; returns the number of files checked.

    Raises:
        SourceChanged: naming the first file that differs or is gone.
    """
    n = 0
    for source, files in recorded.items():
        store = stores[source]
        for rel, fp in files.items():
            path = store.join(rel)
            try:
                now = of_file(store, path)
            except FileNotFoundError:
                raise SourceChanged(store.display(path), "the file is gone") from None
            if what := difference(fp, now):
                raise SourceChanged(store.display(path), what)
            n += 1
    return n


def dumps(recorded: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps({s: dict(sorted(f.items())) for s, f in sorted(recorded.items())}, indent=1)
