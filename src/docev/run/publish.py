"""The one way a run publishes a file or a folder on a filesystem: write under a temporary name, flush and
fsync, rename onto the final name, fsync the parent folder.

A reader then finds either the old content or the new, never a torn file, and after a crash (power
loss, a killed node) the rename is on disk once this returns. Object stores publish through
``docev.outputs`` instead (temp object, verify, server-side copy).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_name(final: Path) -> Path:
    """The temporary sibling a publish of the file ``final`` writes first (a dot name, so listings skip it)."""
    return final.with_name(f".{final.name}.tmp")


def temp_folder(final: Path, parent: Path | None = None) -> Path:
    """A new empty folder to build ``final`` in, beside it (one rename publishes it) or under ``parent``."""
    parent = Path(parent or Path(final).parent)
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{Path(final).name}.partial-", dir=parent))


def remote_names(final: str) -> tuple[str, str]:
    """Where an object-store publish of the folder ``final`` uploads first and moves an old copy aside
    (a store has no rename: the copy onto ``final`` goes file by file, see ``docev.export``)."""
    tag = uuid.uuid4().hex[:8]
    return f"{final}.partial-{tag}", f"{final}.old-{tag}"


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
    ``final`` atomically. A folder replaces an earlier ``final`` folder (a rerun writing the same step
    again, an export with overwrite) by moving it aside first, putting it back if the rename fails, and
    removing it once the new one is in place; a crash in between leaves ``.<name>.old-*`` beside it."""
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        _fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        return final
    for path in tmp.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    fsync_dir(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside)
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
