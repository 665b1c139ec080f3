"""The one way a run publishes a file or a folder on a filesystem: write under a temporary name, flush and
fsync, rename onto the final name, fsync the parent folder.

A reader then finds either the old content or the new, never a torn file, and after a crash (power
loss, a killed node) the rename is on disk once this returns. Object stores publish through
``docev.outputs`` instead (temp object, verify, server-side copy).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(final: Path) -> Path:
    """The temporary sibling a publish of ``final`` writes first (a dot name, so listings skip it)."""
    return final.with_name(f".{final.name}.tmp")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor syncs too (copied files may be read-only)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> Path:
    """Move the complete file or folder ``tmp`` onto ``final`` and make it durable. A file replaces
    ``final`` atomically; a folder replaces an earlier ``final`` folder (removed first: a rerun writing
    the same step again)."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        for path in tmp.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        fsync_dir(tmp)
        if final.is_dir():
            shutil.rmtree(final)
    else:
        _fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


@contextmanager
def publishing(final: Path, mode: str = "w") -> Iterator:
    """``with publishing(path) as fh: fh.write(...)``: the file appears at ``path`` whole, when the block
    ends without an error; on an error the temporary file is removed and ``path`` is untouched."""
    final = Path(final)
    tmp = temp_name(final)
    try:
        with tmp.open(mode) as fh:
            yield fh
            fh.flush()
        publish(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(final: Path, text: str) -> Path:
    """Publish ``text`` as the file ``final``."""
    with publishing(final) as fh:
        fh.write(text)
    return Path(final)


def write_bytes(final: Path, data: bytes) -> Path:
    """Publish ``data`` as the file ``final``."""
    with publishing(final, "wb") as fh:
        fh.write(data)
    return Path(final)
