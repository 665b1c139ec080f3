"""The one way a run publishes a file or a folder on a filesystem: write under a temporary name, flush and
fsync, rename onto the final name, fsync the parent folder.

A reader then finds either the old content or the new, never a torn file, and after a crash (power
loss, a killed node) the rename is on disk once this returns. A folder replacing another is swapped with
it in one ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem have it (ext4, xfs, btrfs,
tmpfs), so the final name holds a whole folder at every instant; elsewhere (NFS) the old one is renamed
aside first, and a kill between the two renames leaves the final name missing (``leftovers`` finds the
hidden folders a recovery works from). Object stores publish through
``docev.outputs`` instead (temp object, verify, server-side copy).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
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


def leftovers(final: Path) -> list[Path]:
    """The hidden ``.<name>.partial-*`` / ``.<name>.old-*`` folders a folder publish of ``final`` leaves when it is
    killed (the staging folder, the old folder moved aside)."""
    final = Path(final)
    return sorted(p for kind in ("partial", "old") for p in final.parent.glob(f".{final.name}.{kind}-*") if p.is_dir())


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


def _load_renameat2() -> Callable | None:
    """libc's ``renameat2`` (glibc ≥ 2.28), or None."""
    try:
        func = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func


_renameat2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders atomically; False (nothing changed) where the kernel or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def publish(tmp: Path, final: Path, remove_old: Callable[[Path], None] = shutil.rmtree) -> Path:
    """Move the complete file or folder ``tmp`` onto ``final`` and make it durable. A file replaces
    ``final`` atomically. A folder replaces an earlier ``final`` folder (a rerun writing the same step
    again, an export with overwrite) by one exchange where the filesystem has it, else by moving it aside
    first (``.<name>.old-*``), putting it back if the rename fails; the old folder is removed with
    ``remove_old`` once the new one is in place."""
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
    if final.exists() and exchange(tmp, final):  # tmp now holds the old folder
        fsync_dir(final.parent)
        remove_old(tmp)
        return final
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
        remove_old(aside)
    return final


@contextmanager
def publishing(final: Path, mode: str = "w", *, unique: bool = False) -> Iterator:
    """``with publishing(path) as fh: fh.write(...)``: the file appears at ``path`` whole, when the block
    ends without an error; on an error the temporary file is removed and ``path`` is untouched. ``unique``:
    a temporary name of this call's own, for files that several processes may publish at once (the same
    content-addressed file)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp") if unique else temp_name(final)
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


def write_bytes(final: Path, data: bytes, *, unique: bool = False) -> Path:
    """Publish ``data`` as the file ``final`` (``unique``: see :func:`publishing`)."""
    with publishing(final, "wb", unique=unique) as fh:
        fh.write(data)
    return Path(final)
