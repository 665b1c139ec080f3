"""Room on disk: checked before training, and named when a save or an export runs out of it.

A full disk used to surface mid-save as ``RuntimeError: [enforce fail at inline_container.cc:672] .
unexpected pos 704 vs 598`` and a restart retrained until the next save failed the same way. Before the
first step every rank checks that ``checkpointer.output_dir`` takes a file and has room for two
checkpoints of the planned size (weights in ``master_dtype`` plus AdamW's two moments of the trained
parameters): below two it warns, below one it refuses, so a restart with the disk still full fails
before it trains (the recipe estimates the size: ``docev.training.memory.checkpoint_bytes``). A save or
an export that fails on a full or read-only file system is re-raised naming the path, the bytes it
needs and the bytes free.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "unexpected pos", "file write failed")


class DiskSpaceError(OSError):
    """A folder docev writes is read-only or has no room for what it writes there."""


def _gb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e9:.2f} GB)"


def check_room(output_dir: Path, need: int) -> str | None:
    """Refuse an ``output_dir`` that takes no file or has room for less than one checkpoint of ``need`` bytes;
    returns a warning when it has room for less than two, else None.

    Raises:
        DiskSpaceError: naming the folder, the bytes needed and the bytes free.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-probe-") as fh:
            fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        why = exc.strerror or exc
        raise DiskSpaceError(exc.errno, f"checkpointer.output_dir {output_dir} is not writable ({why}); training did "
                             "not start") from None  # fmt: skip
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise DiskSpaceError(errno.ENOSPC, f"checkpointer.output_dir {output_dir}: {_gb(free)} free, one checkpoint "
                             f"needs ~{_gb(need)}; free space or move checkpointer.output_dir — training did not "
                             "start")  # fmt: skip
    if free < 2 * need:
        return (f"checkpointer.output_dir {output_dir}: {_gb(free)} free, room for one checkpoint of ~{_gb(need)} "
                "but not two: the save after next may fail")  # fmt: skip
    return None


def explain_write_error(
    exc: BaseException, folder: Path, need: int, fix: str = "move checkpointer.output_dir"
) -> BaseException:
    """``exc`` raised while writing ``folder``, as a :class:`DiskSpaceError` naming path, bytes needed and free
    when the file system is full or read-only; else ``exc`` itself. ``fix`` ends the message."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain)
    root = folder if folder.exists() else folder.parent
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return exc
    if errno.EROFS in codes or "Read-only file system" in text or not os.access(root, os.W_OK):
        return DiskSpaceError(errno.EROFS, f"writing {folder}: the file system is read-only ({_gb(need)} needed, "
                              f"{_gb(free)} free)")  # fmt: skip
    if codes & set(_FULL) or any(t in text for t in _FULL_TEXT) or free < need:
        return DiskSpaceError(errno.ENOSPC, f"writing {folder}: no space left: it needs ~{_gb(need)}, "
                              f"{_gb(free)} free; free space or {fix}")  # fmt: skip
    return exc
