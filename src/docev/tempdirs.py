"""Working folders beside their final names, unique per run, that a killed run cannot leave behind for good.

A step writes under a temporary name and renames into place. Two runs on one ``output_dir`` must not share a
temporary name (each gets a fresh one), and a run killed with ``kill -9`` (an evicted pod) leaves its folder
behind, which the next run removes, but only once it has *proved* the folder stale: every folder has a lock
file beside it that its owner holds (``flock``) for the folder's whole life. A folder whose lock can be
taken, or that has no lock, has no living owner. ``flock`` locks are released by the kernel when a process
dies, and on NFS they are byte-range locks the server keeps per client lease, so a live run on another node
keeps its folder. Only names with the caller's prefix are ever touched: nothing the project did not create.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from docev.run.publish import publish

LOCK_SUFFIX = ".lock"


@contextlib.contextmanager
def owned_tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new empty folder ``parent/<prefix><random>``, locked for the life of the block and removed after it
    (unless the block renamed it into place). Stale folders of the same prefix are swept first."""
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(parent, prefix)
    path = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    lock = path.with_name(path.name + LOCK_SUFFIX)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)  # the lock first: a folder without one is stale
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path.mkdir()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(fd)


def sweep_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the folders named ``<prefix>*`` in ``parent`` whose owner is gone; return them."""
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")):
        if path.name.endswith(LOCK_SUFFIX):
            continue  # a lock alone is left only by a kill between its folder's removal and its own (harmless)
        if path.is_dir() and _unowned(path.with_name(path.name + LOCK_SUFFIX)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _unowned(lock: Path) -> bool:
    """Whether no living process holds ``lock`` (a missing lock file has no owner)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)  # closing releases the lock taken above
    return True


def swap_in(tmp: Path, final: Path) -> None:
    """Publish the folder ``tmp`` as ``final`` (``docev.run.publish``), replacing a folder there, and again when
    another run racing on the same name put its own there in between (the last wins, both complete)."""
    while True:
        try:
            publish(tmp, final)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not tmp.is_dir():
                raise
