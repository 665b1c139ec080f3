"""plan-memory: counts from meta builds equal the real tensors of a CPU run of the tiny model and the local
shards of 2 gloo ranks (memory_worker.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS
from gloo_ranks import run_ranks
from torchao.dtypes.nf4tensor import to_nf4

from docev.config import load_config
from docev.models.docev import materialize
from docev.training.memory import GIB, arch_of, build_meta, check_fits, plan, tensor_bytes
from docev.training.parallelize import frozen_tower

WORKER = Path(__file__).with_name("memory_worker.py")

BASE = ["synthetic=null", "datasets=[{source: /tmp}]", "dtype=fp32", "batch_size=2", "tokenizer.max_seq_len=256"]
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _real(cfg, setup):
    return materialize(build_meta(cfg, arch_of(cfg), setup), "cpu")


def test_plan_matches_a_real_cpu_step():
    for setup, extra in (("full", []), ("lora", LORA)):
        cfg = load_config(CONFIGS / "tiny.yaml", [*BASE, *extra])
        (planned,) = plan(cfg, 1, 2, setups=(setup,))
        model = _real(cfg, setup)
        tower = {id(p) for p in frozen_tower(model)}  # replicated whole on each rank, the rest sharded
        params = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tower) // 2
        params += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) in tower)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert tower and planned.params == params and planned.trainable == sum(p.numel() for p in trainable)
        opt = torch.optim.AdamW(trainable)
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim() > 0)
        assert planned.grads == sum(p.numel() * 4 for p in trainable) // 2 and planned.optimizer == state // 2
        # activations: what the real CPU kernels save for the backward (not sharded across ranks)
        saved, ids = {}, {p.untyped_storage()._cdata for p in model.parameters()}

        def pack(t, saved=saved, ids=ids):
            if t.untyped_storage()._cdata not in ids:
                saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
            return t

        h = torch.randn(2, 256, arch_of(cfg).dim, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.decoder(h).float().logsumexp(-1).sum()
        assert planned.activations == sum(saved.values())
        assert (setup == "lora") == (planned.grads < 0.5 * planned.params)


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    off = plan(load_config(CONFIGS / "tiny.yaml", BASE), setups=("full",))[0].activations
    on = plan(load_config(CONFIGS / "tiny.yaml", [*BASE, "enable_activation_checkpointing=true"]), setups=("full",))[0]
    assert 0 < on.activations < off


def test_nf4_bytes_and_unbuildable_qlora_is_explained():
    w = torch.randn(128, 128, dtype=torch.bfloat16)
    assert tensor_bytes(to_nf4(w)) < 0.3 * tensor_bytes(w)  # 4 bits + block scalers, vs 16 bits
    (qlora,) = plan(load_config(CONFIGS / "tiny.yaml", BASE), setups=("qlora",))
    assert "k_proj holds 128x64 weights" in qlora.note


def test_cli_prints_the_preview_table():
    out = subprocess.run([sys.executable, "-m", "docev.cli", "plan-memory", "--config",
                          str(CONFIGS / "docev_preview.yaml"), "--nnodes", "1", "--gpus-per-node", "8"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-GPU memory (GiB), 8 GPU(s), full sharding over a shard group of 8, master fp32 / compute bf16" in (
        out.stdout
    )
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"full", "lora", "qlora"}
    assert float(rows["qlora"][1]) < float(rows["lora"][1]) and float(rows["lora"][2]) < float(rows["full"][2])


@pytest.fixture(scope="module")
def gloo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memory") / "results.pt"
    return run_ranks(WORKER, 2, out=out)


@pytest.mark.parametrize("case", ["full/full", "full/hybrid", "lora/full", "lora/hybrid"])
def test_plan_equals_the_bytes_held_on_gloo_ranks(gloo, case):
    # fp32 master weights, bf16 compute: local DTensor shards + the replicated bf16 tower, gradients, AdamW state
    res = gloo[case]
    got = res["measured"]
    assert got["missing_grads"] == 0 and res["bytes"] == [got["params"], got["grads"], got["optimizer"]]
    assert res["planned"]["shard_group"] == (2 if case.endswith("/full") else 1)
    assert res["planned"]["strategy"] == case.split("/")[1]


def test_hybrid_divides_by_the_node_and_last_micro_batch_holds_whole_gradients():
    cfg = load_config(CONFIGS / "tiny.yaml", [*BASE, "train.fsdp_strategy=hybrid"])
    (one_node,) = plan(cfg, 1, 2, setups=("full",))
    (two_nodes,) = plan(cfg, 2, 2, setups=("full",))  # 4 GPUs, but each node shards over its 2
    assert two_nodes.shard_group == 2 and (two_nodes.params, two_nodes.grads) == (one_node.params, one_node.grads)
    last = load_config(CONFIGS / "tiny.yaml", [*BASE, "train.gradient_reduction=last_micro_batch"])
    (held,) = plan(last, 1, 2, setups=("full",))
    assert held.grads == 4 * held.trainable  # unsharded fp32 gradients between micro-batches


@pytest.mark.parametrize("nnodes", [1, 2])
def test_preview_state_is_at_least_20_gib_per_gpu(nnodes):
    # fp32 master weights: params 4 B + grads 4 B + AdamW 8 B per trainable element of 11.0B, over 8 GPUs
    cfg = load_config(CONFIGS / "docev_preview.yaml", ["enable_activation_checkpointing=false"])
    (full,) = plan(cfg, nnodes, 8, setups=("full",))
    assert full.shard_group == 8 and full.strategy == ("hybrid" if nnodes == 2 else "full")
    assert (full.params + full.grads + full.optimizer) / GIB >= 20
    assert full.activations / GIB > 80  # 8192 tokens without activation checkpointing
    with pytest.raises(ValueError, match=r"needs 10\d\.\d GiB .* would fit with enable_activation_checkpointing: true"):
        check_fits(cfg, full, 79.2, nnodes=nnodes, gpus_per_node=8)
    check_fits(cfg, full, 139.8, nnodes=nnodes, gpus_per_node=8)


def test_cli_json_and_refusal():
    out = subprocess.run([sys.executable, "-m", "docev.cli", "plan-memory", "--config", str(CONFIGS / "tiny.yaml"),
                          "--gpus-per-node", "2", "--json", "--gpu-memory-gib", "0.01", *BASE],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 1
    rows = {r["setup"]: r for r in json.loads(out.stdout)}
    keys = {"strategy", "shard_group", "params_gib", "grads_gib", "optimizer_gib", "activations_gib", "total_gib"}
    assert keys <= rows["full"].keys() and rows["full"]["shard_group"] == 2
    assert "memory plan: full on 2 GPU(s) (full sharding, shard group 2)" in out.stderr
    assert "no single change" in out.stderr
