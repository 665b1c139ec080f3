"""Shard columns are built from buffers (no pyarrow conversion of Python values, which imports pandas) and hold
what pyarrow's own conversion of the same rows holds."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest
from conftest import ROOT

from docev.data.shards import ShardError, column, schema

ROWS = [
    {"id": "rec-ä1", "source": "src", "source_index": 3, "tokens": [1, 2, 1024], "loss_mask": [False, True, True],
     "len_r2": 70, "len_r3": 40, "images": [
         {"original": b"\x89PNG...", "base": b"", "resized": b"", "height": 842, "width": 595, "canvas_h": 336,
          "canvas_w": 224, "resized_h": 317, "resized_w": 224, "rows": 3, "cols": 2},
         {"original": b"", "base": b"RIFF1", "resized": b"RIFF22", "height": 3508, "width": 2480, "canvas_h": 336,
          "canvas_w": 224, "resized_h": 336, "resized_w": 237, "rows": -1, "cols": 127}]},
    {"id": "", "source": "日本", "source_index": -2, "tokens": [], "loss_mask": [], "len_r2": 0, "len_r3": 0,
     "images": []},
    {"id": "x", "source": "src", "source_index": 0, "tokens": [2**31 - 1], "loss_mask": [True] * 1, "len_r2": 1,
     "len_r3": 1, "images": []},
]  # fmt: skip


def test_columns_equal_pyarrows_conversion():
    shard_schema = schema([2, 3])
    ours = pa.RecordBatch.from_arrays([column([r[f.name] for r in ROWS], f.type) for f in shard_schema],
                                      schema=shard_schema)  # fmt: skip
    ours.validate(full=True)
    assert pa.Table.from_batches([ours]).equals(pa.Table.from_pylist(ROWS, schema=shard_schema))
    assert ours.to_pylist() == ROWS


def test_building_columns_imports_no_pandas():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys, pyarrow as pa; from docev.data.shards import column; "
            "column([[b'a', b''], []], pa.list_(pa.binary())); column([True], pa.bool_()); "
            "print('pandas' in sys.modules)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout == "False\n"


def test_a_column_over_arrows_32_bit_offsets_is_refused():
    with pytest.raises(ShardError, match="over Arrow's 2 GiB"):
        column([range(2**31)], pa.list_(pa.int32()))  # refused from the lengths, before any item is read
