"""Sources and outputs on any fsspec filesystem: local folders, ``s3://``, ``gs://``, ``az://`` ….

One :class:`Store` is a root (a folder or a bucket/prefix) on one filesystem. It resolves names
relative to the root and refuses any that leave it (``..``, another bucket or prefix) unless they are
inside an allowed root; it reads with retries: a transient fault (throttling, 5xx, a reset or dropped
connection, a timeout) is retried with exponential backoff and counted, and one that outlasts the
retries raises :class:`TransientStorageError`, which fails the task so KFP's retry runs it again. It
never becomes a reject. Credentials are never passed here: the filesystem's own chain finds them
(environment, pod identity, a Kubernetes Secret as env); ``storage_options`` holds only endpoint,
region and anonymous access. The libraries' own retries are switched off for S3 so every retry is
ours, and counted.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import fsspec
from fsspec import AbstractFileSystem

from docev.config import StorageOptions, is_store_url

T = TypeVar("T")
R = TypeVar("R")

# The one classification of faults, used by every reader (local disk, NFS/FUSE volumes, object stores): these
# errnos mean "the storage path hiccuped, the bytes are fine" (EIO/ESTALE/ENOTCONN are what NFS and FUSE
# mounts return under load or across a server failover) and are retried; missing, denied and corrupt are not.
_TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EREMOTEIO, errno.ENETDOWN,
    errno.ENETUNREACH, errno.ENETRESET, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENOLINK, errno.ECOMM,
    errno.ETIME, errno.ENOBUFS,
})  # fmt: skip
# Exception classes of the HTTP stacks under fsspec backends that mean "try again" (by name, so no
# backend has to be installed): connection drops, timeouts, truncated bodies, unparsable throttling replies.
_TRANSIENT_NAMES = {"ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError", "ConnectTimeoutError",
                    "HTTPClientError", "ResponseParserError", "IncompleteReadError", "ProxyConnectionError",
                    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ClientOSError",
                    "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "RemoteDisconnected"}  # fmt: skip


class TransientStorageError(RuntimeError):
    """A transient storage fault that outlasted the retries: the task fails (and KFP retries it)."""


class PathEscape(ValueError):
    """A name that resolves outside its store's root and every allowed root."""


def is_url(path: str | Path) -> bool:
    """True for a URL of a non-local filesystem (``s3://…``); local paths and ``file://`` are not."""
    return is_store_url(str(path))


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a fault worth retrying, as opposed to missing/denied/corrupt."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
            return False
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


class _Counter:
    """Retries made in this process (thread-safe): the validate report sums them per source."""

    def __init__(self) -> None:
        self._lock, self.value = threading.Lock(), 0

    def add(self) -> None:
        with self._lock:
            self.value += 1


RETRIES = _Counter()


def with_retries(fn: Callable[[], T], what: str, options: StorageOptions) -> T:
    """``fn()`` retried on transient faults with exponential backoff (``options.retries`` times)."""
    for attempt in range(options.retries + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == options.retries:
                raise TransientStorageError(
                    f"{what}: {type(exc).__name__}: {exc} (still failing after {options.retries} retries)"
                ) from exc
            RETRIES.add()
            time.sleep(min(options.backoff_seconds * 2**attempt, 30.0))
    raise AssertionError("unreachable")


def filesystem_options(protocol: str, options: StorageOptions) -> dict[str, Any]:
    """The backend's keyword arguments for the non-secret options (never credentials)."""
    out: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        # one attempt per call in s3fs and botocore: with_retries makes (and counts) every retry
        out = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}
        if options.endpoint_url:
            out["endpoint_url"] = options.endpoint_url
        if options.region:
            out["client_kwargs"] = {"region_name": options.region}
        if options.anon:
            out["anon"] = True
        return out
    if options.region:
        raise ValueError(f"storage_options.region: only s3:// stores take a region, not {protocol}://")
    if protocol in ("gs", "gcs"):
        out = {"token": "anon"} if options.anon else {}
    elif options.anon:
        out["anon"] = True
    if options.endpoint_url:
        out["endpoint_url"] = options.endpoint_url
    return out


@dataclass
class Store:
    """A root on one filesystem. ``root`` is the filesystem's own path (no protocol for object stores)."""

    url: str
    fs: AbstractFileSystem
    root: str
    options: StorageOptions = field(default_factory=StorageOptions)
    _listing: list[str] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, url: str | Path, options: StorageOptions | None = None) -> Store:
        options = options or StorageOptions()
        url = str(url)
        if not is_url(url):
            return cls(url, fsspec.filesystem("file"), str(Path(url.removeprefix("file://")).resolve()), options)
        protocol = url.split("://", 1)[0]
        try:
            fs = fsspec.filesystem(protocol, **filesystem_options(protocol, options))
        except (ImportError, ValueError) as exc:
            raise ValueError(f"{url}: cannot open a {protocol}:// store ({exc})") from None
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retry loop (a class attribute, not an argument): one attempt
        root = fs._strip_protocol(url).rstrip("/")
        if ".." in root.split("/"):
            raise PathEscape(f"{url}: a store root may not contain '..'")
        return cls(url.rstrip("/"), fs, root, options)

    @property
    def local(self) -> bool:
        return not is_url(self.url)

    @property
    def protocol(self) -> str:
        return "file" if self.local else self.url.split("://", 1)[0]

    def display(self, path: str) -> str:
        """A path of this store as a user would write it (a URL for object stores)."""
        return path if self.local else f"{self.protocol}://{path}"

    def rel(self, path: str) -> str:
        return posixpath.relpath(path, self.root) if not self.local else str(Path(path).relative_to(self.root))

    def join(self, rel: str) -> str:
        """``root/rel`` for a name this project wrote itself (file names from listings and manifests)."""
        return str(Path(self.root) / rel) if self.local else f"{self.root}/{rel}"

    def within(self, path: str) -> bool:
        """Whether a path of this filesystem is the root or below it."""
        if self.local:
            return Path(path).resolve().is_relative_to(Path(self.root).resolve())
        return path == self.root or path.startswith(self.root + "/")

    def resolve(self, name: str, allowed: Iterable[Store] = ()) -> str:
        """The path of ``name`` (relative to the root, or absolute/another URL inside an allowed root).
        Raises :class:`PathEscape` naming where it went. Local symlinks are resolved before the check (a loop
        raises ``OSError(ELOOP)``)."""
        allowed = [a for a in allowed if a.protocol == self.protocol]
        if self.local:
            p = Path(name)
            if is_url(name):
                raise PathEscape(f"{name!r} is on another store than the source root {self.root}")
            candidate, roots = (p, allowed) if p.is_absolute() else (Path(self.root) / p, [self, *allowed])
            try:
                real = str(candidate.resolve())
            except RuntimeError:  # Python < 3.13 reports a symlink loop as RuntimeError; 3.13 as OSError(ELOOP)
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(candidate)) from None
            if not any(r.within(real) for r in roots):
                where = "the allowed roots" if p.is_absolute() else f"the source root {self.root}"
                raise PathEscape(f"{name!r} resolves to {real}, outside {where}")
            return real
        if is_url(name) or name.startswith("/"):
            if is_url(name) and name.split("://", 1)[0] != self.protocol:
                raise PathEscape(f"{name!r} is on another store than the source root {self.url}")
            path, roots = self.fs._strip_protocol(name) if is_url(name) else name.lstrip("/"), allowed
        else:
            path, roots = f"{self.root}/{name}", [self, *allowed]
        normal = posixpath.normpath(path)
        if not any(r.within(normal) for r in roots):
            where = "the allowed roots" if roots is allowed else f"the source root {self.url}"
            raise PathEscape(f"{name!r} resolves to {self.display(normal)}, outside {where}")
        return normal

    def read_bytes(self, path: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(path), f"read {self.display(path)}", self.options)

    def size(self, path: str) -> int:
        return with_retries(lambda: self.fs.size(path), f"stat {self.display(path)}", self.options)

    def exists(self, path: str) -> bool:
        return with_retries(lambda: self.fs.exists(path), f"stat {self.display(path)}", self.options)

    def find(self, suffix: str) -> list[str]:
        """Every file below the root ending with ``suffix``, sorted."""
        if self.local:
            return sorted(str(p) for p in Path(self.root).rglob(f"*{suffix}"))
        if self._listing is None:  # one listing per store: a source asks for several suffixes
            self._listing = sorted(with_retries(lambda: self.fs.find(self.root), f"list {self.url}", self.options))
        return [p for p in self._listing if p.endswith(suffix)]

    def isdir(self) -> bool:
        if self.local:
            return Path(self.root).is_dir()
        return with_retries(lambda: self.fs.isdir(self.root), f"list {self.url}", self.options)

    def open_read(self, path: str) -> IO[bytes]:
        """A seekable binary reader that retries transient faults (reopening at its offset), local or not:
        a network volume's EIO/ESTALE mid-read is the same kind of fault as an object store's reset."""
        return io.BufferedReader(_RetryingReader(self, path), buffer_size=1 << 20)


class _RetryingReader(io.RawIOBase):
    """A raw reader over an object: a read that fails transiently reopens the object at the same offset."""

    def __init__(self, store: Store, path: str):
        super().__init__()
        self.store, self.path, self.pos = store, path, 0
        self._fh: Any = None
        self._size: int | None = None
        if store.local:  # open now, so a missing file fails here (and a transient open fault is retried here)
            with_retries(self._file, f"open {store.display(path)}", store.options)

    def _file(self) -> Any:
        if self._fh is None:
            if self.store.local:
                self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by _drop
            else:
                self._fh = self.store.fs.open(self.path, "rb", block_size=1 << 22)
            self._fh.seek(self.pos)
        return self._fh

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        def attempt() -> bytes:
            try:
                return self._file().read(len(buffer))
            except Exception:
                self._drop()
                raise

        data = with_retries(attempt, f"read {self.store.display(self.path)}", self.store.options)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            if self._size is None:
                self._size = self.store.size(self.path)
            offset += self._size
        elif whence == io.SEEK_CUR:
            offset += self.pos
        self.pos = offset
        if self._fh is not None:
            self._fh.seek(offset)
        return offset

    def tell(self) -> int:
        return self.pos

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(Exception):  # a broken connection may also fail to close; it is replaced
                fh.close()

    def close(self) -> None:
        self._drop()
        super().close()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[tuple[T, R | BaseException]]:
    """``(item, fn(item) or the exception it raised)`` in input order, ``threads`` calls in flight and at most
    ``2·threads`` results held: concurrent I/O over a stream without reading it whole."""
    if threads <= 1:
        for item in items:
            yield item, _call(fn, item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="docev-io") as pool:
        pending: deque[tuple[T, Future]] = deque()
        for item in items:
            pending.append((item, pool.submit(_call, fn, item)))
            if len(pending) >= 2 * threads:
                first, fut = pending.popleft()
                yield first, fut.result()
        while pending:
            first, fut = pending.popleft()
            yield first, fut.result()


def _call(fn: Callable[[T], R], item: T) -> R | BaseException:
    try:
        return fn(item)
    except TransientStorageError:
        raise
    except Exception as exc:  # the caller decides what a failure of this item means (e.g. a reject)
        return exc


_STORES: dict[tuple[str, str, int], Store] = {}


def store_for(url: str | Path, options: StorageOptions | None = None) -> Store:
    """The :class:`Store` of a source or output location, opened once per process."""
    options = options or StorageOptions()
    key = (str(url), options.model_dump_json(), os.getpid())  # a forked worker opens its own clients
    if key not in _STORES:
        _STORES[key] = Store.open(url, options)
    return _STORES[key]


def read_file(location: str, options: StorageOptions | None = None) -> bytes:
    """The bytes of one file by its full location (a path or URL that was confined when it was validated)."""
    store = store_for(location, options)
    return store.read_bytes(store.root)
