"""Where validate and preprocess write: ``output_dir``, a folder or an object-store URL.

The steps write every file on local disk exactly as they do for a folder (temp name, rename), then
:meth:`Outputs.publish` it. For a folder that is a no-op: the file is already at its name. For an
object store the local side is this process's scratch folder and publishing means, in the store's
terms: upload under a temporary name, verify it (size, and the MD5 ETag of a single-part upload),
copy it to its name (a server-side copy: the object appears whole or not at all) and delete the
temporary object. Each step publishes its done-marker last (a validate part's ``stats.json``, a
shard's sidecar, the ``manifest.json`` of the shards and ``manifest.jsonl`` of validate), so a reader
that finds a marker finds what it names, and a rerun redoes exactly what has no marker. Reads and
writes retry transient faults like every :class:`~docev.storage.Store` call; one that outlasts the
retries fails the task.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig
from docev.run.publish import publish, temp_name
from docev.storage import Store, store_for, with_retries


class Outputs:
    """The data outputs of a run (``output_dir``): local paths to write, a store to publish to and read from."""

    def __init__(self, store: Store):
        self.store = store
        self.remote = not store.local
        if self.remote:
            self.scratch = Path(tempfile.mkdtemp(prefix="docev-outputs-"))
            atexit.register(shutil.rmtree, self.scratch, True)
        else:
            self.scratch = Path(store.root)
        self._fetched: dict[str, Path] = {}

    def local(self, rel: str) -> Path:
        """Where this process writes (and, after :meth:`fetch`, reads) ``rel``."""
        return self.scratch / rel

    def where(self, rel: str) -> str:
        """``rel`` as a user finds it: a path, or a URL in the store."""
        return self.store.display(self.store.join(rel))

    def exists(self, rel: str) -> bool:
        return self.local(rel).exists() if not self.remote else self.store.exists(self.store.join(rel))

    def read_text(self, rel: str) -> str:
        if not self.remote:
            return self.local(rel).read_text()
        return self.store.read_bytes(self.store.join(rel)).decode()

    def read_json(self, rel: str) -> Any | None:
        """The parsed JSON file, or None when it does not exist."""
        return json.loads(self.read_text(rel)) if self.exists(rel) else None

    def sha256(self, rel: str) -> str:
        """sha256 of ``rel`` as published (streamed from the store; nothing kept locally)."""

        def digest() -> str:
            h = hashlib.sha256()
            with self.store.open_read(self.store.join(rel)) as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
            return h.hexdigest()

        return digest() if not self.remote else with_retries(digest, f"hash {self.where(rel)}", self.store.options)

    def fetch(self, rel: str) -> Path:
        """A local copy of the published ``rel`` (downloaded once per process; the path itself for a folder)."""
        if not self.remote:
            return self.local(rel)
        if rel not in self._fetched:
            path, remote = self.local(rel), self.store.join(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(path)
            with_retries(lambda: self.store.fs.get_file(remote, str(tmp)), f"read {self.where(rel)}",
                         self.store.options)  # fmt: skip
            if tmp.stat().st_size != self.store.size(remote):
                raise OSError(f"{self.where(rel)}: downloaded {tmp.stat().st_size} bytes, the store holds another size")
            publish(tmp, path)
            self._fetched[rel] = path
        return self._fetched[rel]

    def publish(self, rel: str, keep: bool = True) -> None:
        """Make the local file ``rel`` the store's ``rel`` (temp name, verify, copy, delete the temp).
        ``keep=False`` drops the local copy afterwards (shards: the scratch folder stays small)."""
        if not self.remote:
            return
        path, final = self.local(rel), self.store.join(rel)
        head, _, name = final.rpartition("/")
        tmp = f"{head}/.{name}.tmp-{uuid.uuid4().hex[:12]}"
        fs, opts = self.store.fs, self.store.options
        with_retries(lambda: fs.put_file(str(path), tmp), f"write {self.where(rel)}", opts)
        self._verify(path, tmp, rel)
        with_retries(lambda: fs.copy(tmp, final), f"publish {self.where(rel)}", opts)
        with_retries(lambda: fs.rm_file(tmp), f"delete {self.store.display(tmp)}", opts)
        self._fetched[rel] = path
        if not keep:
            path.unlink()
            self._fetched.pop(rel)

    def _verify(self, path: Path, tmp: str, rel: str) -> None:
        info = with_retries(lambda: self.store.fs.info(tmp), f"stat {self.store.display(tmp)}", self.store.options)
        size = path.stat().st_size
        if info.get("size") != size:
            raise OSError(f"{self.where(rel)}: uploaded {size} bytes, the store holds {info.get('size')}")
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag and "-" not in etag and len(etag) == 32:  # a single-part upload's ETag is its MD5
            md5 = hashlib.md5(usedforsecurity=False)
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    md5.update(chunk)
            if md5.hexdigest() != etag:
                raise OSError(f"{self.where(rel)}: the uploaded MD5 {etag} is not the file's {md5.hexdigest()}")

    def publish_tree(self, rel: str) -> None:
        """Publish every file below the local folder ``rel`` (report thumbnails)."""
        root = self.local(rel)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.publish(f"{rel}/{path.relative_to(root).as_posix()}")

    def remove(self, rel: str) -> None:
        """Delete ``rel`` where it is published, if it is (a done-marker a rerun is about to replace)."""
        self._fetched.pop(rel, None)
        if not self.remote:
            self.local(rel).unlink(missing_ok=True)
        elif self.exists(rel):
            with_retries(lambda: self.store.fs.rm_file(self.store.join(rel)), f"delete {self.where(rel)}",
                         self.store.options)  # fmt: skip


_OUTPUTS: dict[tuple[str, str, int], Outputs] = {}


def outputs(cfg: DocEVConfig) -> Outputs:
    """The run's :class:`Outputs`, one per process (a forked worker makes its own scratch and clients)."""
    key = (cfg.output_dir, cfg.output_storage_options.model_dump_json(), os.getpid())
    if key not in _OUTPUTS:
        _OUTPUTS[key] = Outputs(store_for(cfg.output_dir, cfg.output_storage_options))
    return _OUTPUTS[key]
