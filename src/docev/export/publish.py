"""Publishing an export folder without ever destroying what this project did not write.

An export carries a manifest (``docev_export.json``, listed in its ``SHA256SUMS``). ``--out`` may only
replace a folder that holds one and nothing besides the files its ``SHA256SUMS`` lists; anything else is
refused, naming the folder, and nothing is deleted. Exports to one destination are serialised by a lock
file beside it (``flock``: the kernel drops it when the holder dies, so a held lock means a live export).

Locally the verified staging folder is swapped with the destination (``docev.run.publish``) by one
``renameat2(RENAME_EXCHANGE)``: at every instant the destination is a whole export, the old or the new.
Where the filesystem lacks it (NFS, some overlays) the old export is renamed aside first and a kill
between the two renames leaves no destination; the next export to that destination (``recover``) puts
the newest whole hidden export back before anything else. Hidden folders beside the destination are
removed only when they hold this project's manifest or staging mark (or are empty); both marks are
unlinked last, so a folder whose removal was interrupted is still provably ours.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from docev.export.checksums import ChecksumError, list_files, read_checksums, verify_checksums
from docev.run.publish import leftovers, publish, temp_folder

MANIFEST = "docev_export.json"  # in every export: what recognises a folder this project wrote
FORMAT = "docev-export"
STAGING_MARK = ".docev-staging"  # in a staging folder until its manifest is written


class DestinationRefused(ValueError):
    """A destination this project may not replace, or one another export is writing."""


def manifest_of(fs: AbstractFileSystem, root: str) -> dict | None:
    """The export manifest of ``root``, or None when it has none (or an unreadable one)."""
    path = f"{root.rstrip('/')}/{MANIFEST}"
    try:
        data = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def check_replaceable(fs: AbstractFileSystem, root: str, shown: str) -> None:
    """Refuse (naming ``shown``) unless ``root`` is an export this project wrote and holds nothing else.

    Raises:
        DestinationRefused: a symlink, a file, a folder without the manifest, or one with extra files.
    """
    tail = "; nothing was deleted: choose another --out (export.destination) or move it away yourself"
    if isinstance(fs, LocalFileSystem) and os.path.islink(root):
        raise DestinationRefused(f"{shown} is a symlink; refusing to replace it{tail}")
    if not fs.isdir(root):
        raise DestinationRefused(f"{shown} exists and is not a folder{tail}")
    if manifest_of(fs, root) is None:
        raise DestinationRefused(f"{shown} holds no export written by docev (no valid {MANIFEST}){tail}")
    try:
        listed = set(read_checksums(fs, root))
    except ChecksumError as exc:
        raise DestinationRefused(f"{shown}: {exc}{tail}") from None
    extra = sorted(set(list_files(fs, root)) - listed)
    if extra:
        raise DestinationRefused(f"{shown} holds files docev did not write: {', '.join(extra[:10])}{tail}")


@contextmanager
def destination_lock(dest: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``dest`` for one export; removed on the way out.

    Raises:
        DestinationRefused: another live export holds it.
    """
    path = dest.with_name(f".{dest.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DestinationRefused(f"another export to {dest} is running (it holds {path})") from None
        try:  # the holder we waited on may have unlinked the file: lock the one at the path
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _ours(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / STAGING_MARK).is_file() or not any(folder.iterdir())


def _whole(folder: Path) -> bool:
    try:
        verify_checksums(folder)
    except (ChecksumError, OSError):
        return False
    return manifest_of(fsspec.filesystem("file"), str(folder)) is not None


def remove_owned(folder: Path) -> None:
    """Delete a folder of ours, its marks last: interrupted anywhere, it still proves it is ours."""
    marks = [folder / MANIFEST, folder / STAGING_MARK]
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = Path(root, name)
            if path not in marks:
                path.unlink()
        for name in dirs:
            Path(root, name).rmdir()
    for mark in marks:
        mark.unlink(missing_ok=True)
    folder.rmdir()


def recover(dest: Path, *, restore: bool = True) -> list[str]:
    """Under the destination's lock: put a whole hidden export back where the destination is missing (a
    rename-aside publish was killed between its renames; only with ``restore``), then remove every hidden
    folder provably ours. Returns a line per hidden folder kept because nothing proves it is ours."""
    hidden = leftovers(dest)
    if restore and not dest.exists():
        old_first = sorted(hidden, key=lambda p: (".old-" not in p.name, -p.stat().st_mtime))
        for folder in old_first:
            if _whole(folder):
                publish(folder, dest)
                hidden.remove(folder)
                break
    kept = []
    for folder in hidden:
        if _ours(folder):
            remove_owned(folder)
        else:
            kept.append(f"{folder}: not removed, it holds no {MANIFEST} or {STAGING_MARK}")
    return kept


def new_staging(dest: Path) -> Path:
    """An empty staging folder beside ``dest`` holding only the staging mark."""
    staging = temp_folder(dest)
    (staging / STAGING_MARK).touch()
    return staging


def seal(staging: Path, manifest: dict) -> None:
    """Write the manifest (it now proves the folder ours) and drop the staging mark; ``SHA256SUMS`` follows."""
    (staging / MANIFEST).write_text(json.dumps({"format": FORMAT, **manifest}, indent=2))
    (staging / STAGING_MARK).unlink()


def replace_export(staging: Path, dest: Path) -> None:
    """Put the sealed, verified ``staging`` at ``dest`` (already checked replaceable); the old export stays
    whole at ``dest`` until the new one is (``docev.run.publish``) and is then removed marks-last."""
    publish(staging, dest, remove_old=remove_owned)
