"""Stage the shards to a node-local folder once per node, then memory-map them from there.

Shards live on a shared volume (NFS, CephFS, a cloud file store) or in an object store (an
object-store ``output_dir``, read through :mod:`docev.storage`); random row reads over the network
cost a round trip each, and an object store cannot be memory-mapped at all. With
``dataloader.cache_dir`` set (required for an object-store ``output_dir``), every rank calls
:func:`stage_shards`; the first process of the node to take the cache's lock (an exclusive ``flock``,
so it works whatever the launcher and whichever local rank comes first) copies every shard (streamed,
retried, sha256 computed while copying and checked against ``manifest.json``, written under a
temporary name, then renamed) and writes the manifest last; the node's other ranks wait on the lock
and find the manifest in place. A cache holding another run's shards is a different folder (the
folder is named by the source manifest's sha256), so runs never mix shards.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

from docev.config import DocEVConfig, StorageOptions
from docev.data.shards import ShardError, sha256_file
from docev.data.split import Split
from docev.outputs import outputs
from docev.run.paths import SHARDS_MANIFEST, shards_key, shards_manifest_key
from docev.run.publish import publish, temp_name, write_bytes
from docev.storage import store_for, with_retries


def local_shards(cfg: DocEVConfig, split: Split = "train") -> Path | None:
    """The folder training memory-maps for the split: staged into ``dataloader.cache_dir`` when that is set,
    else where preprocess wrote it. None when the split was not built (no ``manifest.json``)."""
    outs, rel = outputs(cfg), shards_key(split)
    if not outs.exists(shards_manifest_key(split)):
        return None
    if cfg.dataloader.cache_dir is None:
        return outs.local(rel)
    return stage_shards(outs.where(rel), cfg.dataloader.cache_dir, cfg.output_storage_options)


def stage_shards(source: str | Path, cache_dir: str | Path, options: StorageOptions | None = None) -> Path:
    """A local folder holding the shards of ``source`` (a folder or fsspec URL with ``manifest.json``)."""
    store = store_for(str(source), options)
    manifest_bytes = store.read_bytes(store.join(SHARDS_MANIFEST))
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:16]
    target = Path(cache_dir) / f"shards-{digest}"
    target.mkdir(parents=True, exist_ok=True)
    with (target / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process per node stages; the others wait here, then find it done
        done = target / SHARDS_MANIFEST
        if done.is_file() and done.read_bytes() == manifest_bytes:
            return target
        shards = json.loads(manifest_bytes)["shards"]
        for shard in shards:
            _copy_verified(store, shard["file"], shard["sha256"], target)
        write_bytes(done, manifest_bytes)  # published last: a cache with a manifest is complete
        print(f"staged {len(shards)} shard(s) of {store.url} into {target} (local rank "
              f"{os.environ.get('LOCAL_RANK', '0')}; the node's other ranks reuse them)", file=sys.stderr)  # fmt: skip
    return target


def _copy_verified(store, name: str, sha256: str, target: Path) -> None:
    final = target / name
    if final.is_file() and sha256_file(final) == sha256:
        return  # left by a staging that was interrupted after this shard
    tmp = temp_name(final)

    def copy() -> str:
        h = hashlib.sha256()
        with store.open_read(store.join(name)) as src, tmp.open("wb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                h.update(chunk)
                dst.write(chunk)
        return h.hexdigest()

    got = with_retries(copy, f"stage {store.display(store.join(name))}", store.options)
    if got != sha256:
        tmp.unlink()
        raise ShardError(f"{store.display(store.join(name))}: sha256 {got[:12]}… while staging, manifest says "
                         f"{sha256[:12]}…: corrupt shard")  # fmt: skip
    publish(tmp, final)
