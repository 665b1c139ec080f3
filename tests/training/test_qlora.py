"""QLoRA under FSDP2 on 2 CPU ranks (torchao's NF4 runs on CPU; sharding splits its quantisation factors),
sharded and filled as the recipe does it (qlora_fsdp_worker.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a torchrun QLoRA run (NF4 on CPU) (`make test-fast` leaves it out)


def test_qlora_trains_sharded_on_two_cpu_ranks():
    worker = Path(__file__).with_name("qlora_fsdp_worker.py")
    # --standalone: a free port, so concurrent torchrun jobs on the machine do not collide
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        str(worker),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the two ranks share stdout: their lines may run together, so take each JSON object wherever it is
    rows = [json.loads(obj) for obj in re.findall(r"\{[^{}]*\}", proc.stdout)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        # the recipe's fill put the base where the unsharded model has it (a wrong base changes the logits by ~1)
        assert r["logits_diff"] < 1e-5, r["logits_diff"]
        assert r["local"] == "NF4Tensor"  # each rank holds its shard of the NF4 weight
        assert not r["tower_sharded"]  # the recipe's layout: the frozen tower replicated, not sharded
        assert r["losses"][-1] < r["losses"][0] - 0.2, r["losses"]
