"""``SHA256SUMS``: one ``<sha256>  <name>`` line per file of an export (``sha256sum -c`` reads it).

It is written last and checked on every copy, so a folder whose sums verify is complete and
intact: a missing, extra or changed file is an error that names the file. Works on local folders
and on any fsspec location (``s3://…``, ``memory://…``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
from fsspec import AbstractFileSystem

SUMS = "SHA256SUMS"


class ChecksumError(ValueError):
    """An export whose files do not match its ``SHA256SUMS``; ``problems`` has one line per file."""

    def __init__(self, location: str, problems: list[str]):
        self.location, self.problems = location, problems
        super().__init__(f"{location}: " + "; ".join(problems))


def file_sha256(fs: AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def list_files(fs: AbstractFileSystem, root: str) -> list[str]:
    """Paths of every file under ``root``, relative to it, ``SHA256SUMS`` excluded, sorted."""
    root = root.rstrip("/")
    names = [p[len(root) + 1 :] for p in fs.find(root)]
    return sorted(n for n in names if n != SUMS)


def write_checksums(folder: Path) -> dict[str, str]:
    """Hash every file in ``folder`` into ``folder/SHA256SUMS``; returns name → sha256."""
    fs = fsspec.filesystem("file")
    sums = {name: file_sha256(fs, str(folder / name)) for name in list_files(fs, str(folder))}
    (folder / SUMS).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_checksums(fs: AbstractFileSystem, root: str) -> dict[str, str]:
    path = f"{root.rstrip('/')}/{SUMS}"
    if not fs.isfile(path):
        raise ChecksumError(root, [f"no {SUMS}: not a finished export"])
    sums = {}
    for n, line in enumerate(fs.cat_file(path).decode().splitlines(), start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or name in sums:
            raise ChecksumError(root, [f"{SUMS} line {n} is malformed: {line[:80]!r}"])
        sums[name] = digest
    return sums


def verify_checksums(location: str | Path) -> dict[str, str]:
    """Recompute every file's sha256 and compare with ``SHA256SUMS``; returns name → sha256.

    Raises:
        ChecksumError: naming each changed, missing or unlisted file.
    """
    fs, root = fsspec.core.url_to_fs(str(location))
    expected = read_checksums(fs, root)
    present = set(list_files(fs, root))
    problems = [f"{name}: listed in {SUMS} but missing" for name in sorted(set(expected) - present)]
    problems += [f"{name}: not listed in {SUMS}" for name in sorted(present - set(expected))]
    for name in sorted(present & set(expected)):
        got = file_sha256(fs, f"{root.rstrip('/')}/{name}")
        if got != expected[name]:
            problems.append(f"{name}: sha256 {got[:12]}… differs from {SUMS} ({expected[name][:12]}…)")
    if problems:
        raise ChecksumError(str(location), problems)
    return expected
