"""A source changed between validate and preprocess is refused, naming the file: a record edited in place, an
image replaced, a record appended, a file reordered (local folders here; the object store in
tests/data/test_object_storage.py). Bytes put back as they were (a new mtime) are accepted again."""

import json
import shutil

import pytest
from conftest import tiny_config

from docev.data.preprocess import check_sources, run_shards
from docev.sources.fingerprints import SourceChanged
from docev.validate.runner import run_validate


def _edit(data: bytes) -> bytes:
    """The first record's answer edited in place (same length: only the content hash can tell)."""
    first, rest = data.split(b"\n", 1)
    assert b'"content": "form"' in first
    return first.replace(b'"content": "form"', b'"content": "fork"') + b"\n" + rest


def _reorder(data: bytes) -> bytes:
    lines = data.splitlines(keepends=True)
    return b"".join([lines[1], lines[0], *lines[2:]])


def _append(data: bytes) -> bytes:
    record = json.loads(data.splitlines()[0]) | {"id": "doc-appended"}
    return data + json.dumps(record).encode() + b"\n"


MUTATIONS = {"edited in place": ("data.jsonl", _edit), "reordered": ("data.jsonl", _reorder),
             "appended": ("data.jsonl", _append)}  # fmt: skip


@pytest.fixture(scope="module")
def validated(tmp_path_factory, tiny_checkpoint, synth_sources):
    root = tmp_path_factory.mktemp("fingerprints")
    source = root / "instruct"
    shutil.copytree(synth_sources["instruct"], source)
    cfg = tiny_config(root / "run", tiny_checkpoint, [{"source": str(source), "name": "instruct"}],
                      "preprocess.records_per_shard=100")  # fmt: skip
    run_validate(cfg, workers=1)
    return cfg, source


@pytest.mark.parametrize("change", [*MUTATIONS, "image replaced"])
def test_preprocess_refuses_a_source_changed_since_validate(validated, change):
    cfg, source = validated
    if change == "image replaced":  # another page of the same source (the manifest says 300x1100, 10 tiles)
        path = source / "images" / "000000_0.png"
        replacement = (source / "images" / "000002_0.jpg").read_bytes()
    else:
        name, mutate = MUTATIONS[change]
        path = source / name
        replacement = mutate(path.read_bytes())
    original = path.read_bytes()
    path.write_bytes(replacement)
    try:
        with pytest.raises(SourceChanged, match=f"source changed since validate: {path}.* — run validate again"):
            run_shards(cfg, workers=1)
    finally:
        path.write_bytes(original)  # the bytes validate read, with a new mtime: accepted
    assert check_sources(cfg) == 1
    if change == "image replaced":  # the last case: the shard builds from the validated bytes
        assert run_shards(cfg, workers=1) == [0]
