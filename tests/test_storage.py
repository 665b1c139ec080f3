"""docev.storage: confinement in object stores, which faults are transient, retries, ordered concurrent reads."""

from __future__ import annotations

import errno
import threading
import time

import pytest

from docev.config import StorageOptions
from docev.storage import (
    PathEscape,
    Store,
    TransientStorageError,
    filesystem_options,
    is_transient,
    is_url,
    ordered_map,
    with_retries,
)

FAST = StorageOptions(retries=3, backoff_seconds=0.0)


def test_urls_and_local_paths():
    assert is_url("s3://b/p") and is_url("gs://b") and not is_url("/data/x") and not is_url("file:///data/x")


def test_confinement_in_an_object_store():
    store = Store.open("memory://bucket/ufx/src")
    other = Store.open("memory://bucket/shared")
    assert store.resolve("images/a.png") == "/bucket/ufx/src/images/a.png"
    assert store.resolve("images/../b.png") == "/bucket/ufx/src/b.png"
    with pytest.raises(PathEscape, match="outside the source root memory://bucket/ufx/src"):
        store.resolve("../../shared/a.png")
    with pytest.raises(PathEscape, match="outside the source root"):
        store.resolve("../srcX/a.png")  # a sibling prefix sharing the root's name as a string prefix
    with pytest.raises(PathEscape, match="outside the allowed roots"):
        store.resolve("memory://bucket/shared/a.png")
    with pytest.raises(PathEscape, match="another store"):
        store.resolve("s3://bucket/ufx/src/a.png")
    assert store.resolve("../../shared/a.png", [other]) == "/bucket/shared/a.png"
    assert store.resolve("memory://bucket/shared/a.png", [other]) == "/bucket/shared/a.png"


def test_transient_faults_are_told_from_missing_or_denied():
    class ConnectionClosedError(Exception):  # botocore's name, matched without importing botocore
        pass

    assert is_transient(OSError(errno.EBUSY, "SlowDown")) and is_transient(ConnectionResetError())
    # what NFS and FUSE volumes return under load or across a server failover
    for code in (errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNRESET, errno.EAGAIN):
        assert is_transient(OSError(code, "x")), errno.errorcode[code]
    assert not is_transient(OSError(errno.ELOOP, "loop")) and not is_transient(IsADirectoryError("dir"))
    assert is_transient(ConnectionClosedError()) and is_transient(TimeoutError())
    wrapped = RuntimeError("read failed")
    wrapped.__cause__ = OSError(errno.EREMOTEIO, "InternalError")
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("x")) and not is_transient(PermissionError("denied"))
    assert not is_transient(ValueError("corrupt"))


def test_retries_then_success_or_a_task_failure():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EBUSY, "SlowDown")
        return "ok"

    assert with_retries(flaky, "read x", FAST) == "ok" and len(calls) == 3
    with pytest.raises(TransientStorageError, match="read y: .*still failing after 3 retries"):
        with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("reset")), "read y", FAST)
    with pytest.raises(FileNotFoundError):  # not transient: raised at once, no retry
        with_retries(lambda: (_ for _ in ()).throw(FileNotFoundError("gone")), "read z", FAST)


def test_s3_options_switch_off_library_retries_and_carry_no_secret():
    opts = filesystem_options("s3", StorageOptions(endpoint_url="http://minio:9000", region="eu-west-1", anon=True))
    assert opts == {"config_kwargs": {"retries": {"total_max_attempts": 1}}, "endpoint_url": "http://minio:9000",
                    "client_kwargs": {"region_name": "eu-west-1"}, "anon": True}  # fmt: skip
    with pytest.raises(ValueError, match="only s3:// stores take a region"):
        filesystem_options("gs", StorageOptions(region="x"))


def test_ordered_map_keeps_order_bounds_work_and_passes_errors_through():
    threads, active, peak, lock = 4, [0], [0], threading.Lock()
    together = threading.Barrier(threads, timeout=30)  # the first `threads` calls must all be in flight at once
    pulled = [0]

    def items():
        for i in range(20):
            pulled[0] += 1
            yield i

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        if i < threads:
            together.wait()  # a serial map breaks the barrier (its error becomes the item's result)
        time.sleep(0.01 * (i % 3))
        with lock:
            active[0] -= 1
        if i == 5:
            raise ValueError("bad item")
        return i * i

    out, ahead = [], []
    for item, result in ordered_map(work, items(), threads=threads):
        ahead.append(pulled[0] - item)  # input items read beyond the one being handed out
        out.append((item, result))
    assert [i for i, _ in out] == list(range(20)) and peak[0] == threads
    assert [r for _, r in out[:threads]] == [i * i for i in range(threads)]
    assert isinstance(out[5][1], ValueError) and out[6][1] == 36
    assert max(ahead) == 2 * threads  # a stream is read at most 2·threads items ahead, never whole
    with pytest.raises(TransientStorageError):
        list(ordered_map(lambda i: (_ for _ in ()).throw(TransientStorageError("down")), range(3), threads=2))


def test_an_object_store_output_dir_needs_a_work_dir_and_a_node_local_cache(tmp_path):
    from conftest import CONFIGS

    from docev.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:  # tiny.yaml says work_dir: ${output_dir}
        load_config(CONFIGS / "tiny.yaml", ["output_dir=s3://bucket/run"])
    text = str(err.value)
    assert "work_dir: 's3://bucket/run': must be a folder or volume" in text and "set work_dir to one" in text
    assert "dataloader.cache_dir: required with an object-store output_dir (s3://bucket/run)" in text
    assert "checkpointer.output_dir: 's3://bucket/run/checkpoints': must be a folder or volume" in text
    with pytest.raises(ConfigError, match="work_dir: required with an object-store output_dir"):
        load_config(
            CONFIGS / "tiny.yaml", ["output_dir=s3://bucket/run", "work_dir=null", f"dataloader.cache_dir={tmp_path}"]
        )
    cfg = load_config(CONFIGS / "tiny.yaml", ["output_dir=s3://bucket/run", f"work_dir={tmp_path}",
                                              f"dataloader.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert cfg.work_root == tmp_path and cfg.checkpointer.output_dir == f"{tmp_path}/checkpoints"
