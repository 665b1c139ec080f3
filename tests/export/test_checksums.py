"""SHA256SUMS: written in sha256sum's format, every kind of damage named, local and fsspec alike."""

import hashlib

import fsspec
import pytest

from docev.export.checksums import SUMS, ChecksumError, verify_checksums, write_checksums

from .conftest import sha256sum_check


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "export"
    d.mkdir()
    (d / "a.bin").write_bytes(bytes(range(256)) * 100)
    (d / "config.json").write_text('{"x": 1}')
    return d


def test_sums_match_hashlib_and_sha256sum(folder):
    sums = write_checksums(folder)
    assert sums == {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("a.bin", "config.json")}
    assert verify_checksums(folder) == sums
    done = sha256sum_check(folder)
    assert done.returncode == 0 and "a.bin: OK" in done.stdout


def test_damage_is_named(folder):
    write_checksums(folder)
    data = bytearray((folder / "a.bin").read_bytes())
    data[1000] ^= 1
    (folder / "a.bin").write_bytes(bytes(data))
    (folder / "config.json").unlink()
    (folder / "stray.txt").write_text("left over")
    with pytest.raises(ChecksumError) as err:
        verify_checksums(folder)
    assert err.value.problems == [
        "config.json: listed in SHA256SUMS but missing",
        "stray.txt: not listed in SHA256SUMS",
        f"a.bin: sha256 {hashlib.sha256(data).hexdigest()[:12]}… differs from SHA256SUMS "
        f"({hashlib.sha256(bytes(range(256)) * 100).hexdigest()[:12]}…)",
    ]


def test_missing_or_malformed_sums(folder):
    with pytest.raises(ChecksumError, match="no SHA256SUMS: not a finished export"):
        verify_checksums(folder)
    (folder / SUMS).write_text("abc a.bin\n")
    with pytest.raises(ChecksumError, match="SHA256SUMS line 1 is malformed"):
        verify_checksums(folder)


def test_fsspec_memory_location(folder):
    sums = write_checksums(folder)
    fs = fsspec.filesystem("memory")
    for name in [*sums, SUMS]:
        fs.put_file(str(folder / name), f"/ck/run/{name}")
    assert verify_checksums("memory://ck/run") == sums
    fs.pipe_file("/ck/run/config.json", b'{"x": 2}')
    with pytest.raises(ChecksumError, match="config.json: sha256 .* differs"):
        verify_checksums("memory://ck/run")
    fs.rm("/ck", recursive=True)
