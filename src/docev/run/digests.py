"""Digests of a checkpoint folder: every file hashed when written, recorded in ``checkpoint_manifest.json``.

A flipped bit or a truncated shard used to be trained on (DCP and safetensors read whatever bytes are
there) or crashed with messages that named no file. Each rank hashes what it writes (DCP:
``docev.models.docev._dcp.DigestingWriter``, which runs in the background writer for async saves) into
a sidecar ``.digest.<file>`` (:func:`record_written`); rank 0 hashes the files it wrote itself when it
seals the folder (:func:`seal`), merges the sidecars and writes the manifest before the folder is
published (``docev.run.publish`` fsyncs every file and the parent, then ``latest`` moves). Readers (resume, export,
evaluate, generate, ``docev checkpoint verify``) recompute and compare; a mismatch names the folder,
the file and what differs. The hash is xxHash's XXH3-128 (the ``xxhash`` package), built for
throughput, so a save's cost stays a few percent (``benchmarks/checkpoint_io.py`` measures it); it guards
against corruption, not tampering (exports carry ``SHA256SUMS`` for that).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xxhash

MANIFEST = "checkpoint_manifest.json"
FORMAT = "docev-checkpoint"
HASH = "xxh3_128"
_SIDECAR = ".digest."
_CHUNK = 8 << 20
_verified: set[tuple] = set()  # folders fully verified in this process, keyed by their files' stat


class CheckpointCorrupt(ValueError):
    """A checkpoint folder whose files do not match its manifest; ``problems`` has one line per file."""

    def __init__(self, folder: Path | str, problems: list[str]):
        self.folder, self.problems = Path(folder), problems
        super().__init__(f"checkpoint {folder} does not verify: " + "; ".join(problems))


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size", "xxh3_128"}`` of a file, read in 8 MiB chunks."""
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
            size += n
    return {"size": size, HASH: h.hexdigest()}


def record_written(folder: Path, name: str) -> None:
    """The writer of ``folder/name`` records its digest (a sidecar rank 0 merges into the manifest)."""
    (folder / f"{_SIDECAR}{name}").write_text(json.dumps(file_digest(folder / name)))


def seal(folder: Path, step: int, record: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``checkpoint_manifest.json`` into the unpublished ``folder``: the sidecars' digests plus a digest
    of every other file (the ones the caller, rank 0, wrote), the step and ``record`` (the recipe state's
    summary). The folder's publish makes it durable with the rest."""
    files: dict[str, dict[str, Any]] = {}
    sidecars = sorted(folder.glob(f"{_SIDECAR}*"))
    for sidecar in sidecars:
        files[sidecar.name.removeprefix(_SIDECAR)] = json.loads(sidecar.read_text())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST and path not in sidecars and path.name not in files:
            files[path.name] = file_digest(path)
    for name, digest in files.items():  # a sidecar's file must still be the bytes it hashed
        if (folder / name).stat().st_size != digest["size"]:
            raise CheckpointCorrupt(folder, [f"{name}: changed size after it was written"])
    manifest = {"format": FORMAT, "step": step, "hash": HASH, "files": files}
    if record:
        manifest["recipe"] = dict(record)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for sidecar in sidecars:
        sidecar.unlink()
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, None without one.

    Raises:
        CheckpointCorrupt: a manifest that cannot be read or parsed.
    """
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes())
        if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
            raise ValueError("not a docev checkpoint manifest")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointCorrupt(folder, [f"{MANIFEST}: unreadable ({exc})"]) from None
    return data


def check_files(folder: Path, manifest: Mapping[str, Any], share: tuple[int, int] = (0, 1)) -> list[str]:
    """Recompute the digests of this share (``(k, n)``: every n-th file from the k-th, so n ranks split the
    work); returns one line per file that is missing, unreadable, of another size or other bytes."""
    problems = []
    for i, (name, want) in enumerate(sorted(manifest["files"].items())):
        if i % share[1] != share[0]:
            continue
        path = Path(folder) / name
        try:
            got = file_digest(path)
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc.strerror or exc})")
            continue
        if got["size"] != want["size"]:
            problems.append(f"{name}: {got['size']} bytes, the manifest says {want['size']} (truncated or appended)")
        elif got[HASH] != want[HASH]:
            problems.append(f"{name}: {HASH} {got[HASH][:16]}… differs from the manifest's {want[HASH][:16]}… "
                            "(same size, changed bytes)")  # fmt: skip
    return problems


def verify_checkpoint(folder: Path | str, *, required: bool = True) -> dict[str, Any] | None:
    """Check every file of ``folder`` against its manifest (once per process and manifest). A folder without
    a manifest is an error when ``required`` (a ``step_N`` of this project), else it is not checked (a base
    checkpoint). Returns the manifest.

    Raises:
        CheckpointCorrupt: naming the folder and each file that differs.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if required:
            raise CheckpointCorrupt(folder, [f"no {MANIFEST} (not a complete checkpoint written by this docev)"])
        return None
    key = _stat_key(folder, manifest)
    if key not in _verified:
        problems = check_files(folder, manifest)
        if problems:
            raise CheckpointCorrupt(folder, problems)
        if key != (None,):
            _verified.add(key)
    return manifest


def _stat_key(folder: Path, manifest: Mapping[str, Any]) -> tuple:
    """(folder, inode, size, mtime of the manifest and of every file): any write since a check misses the cache."""
    stats = []
    for name in [MANIFEST, *sorted(manifest["files"])]:
        try:
            st = (folder / name).stat()
        except OSError:
            return (None,)  # not cacheable: check_files reports it
        stats.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
    return (str(folder.resolve()), *stats)
