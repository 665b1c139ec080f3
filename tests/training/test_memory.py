"""plan-memory: counts from meta builds equal the real tensors of a CPU run of the tiny model."""

import subprocess
import sys

import torch
from conftest import CONFIGS
from torchao.dtypes.nf4tensor import to_nf4

from docev.config import load_config
from docev.training.memory import arch_of, build_meta, plan, tensor_bytes
from docev.training.parallelize import frozen_tower

BASE = ["synthetic=null", "datasets=[{source: /tmp}]", "dtype=fp32", "batch_size=2", "tokenizer.max_seq_len=256"]
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _real(cfg, setup):
    model = build_meta(cfg, arch_of(cfg), setup).to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.02)
    return model


def test_plan_matches_a_real_cpu_step():
    for setup, extra in (("full", []), ("lora", LORA)):
        cfg = load_config(CONFIGS / "tiny.yaml", [*BASE, *extra])
        (planned,) = plan(cfg, 2, setups=(setup,))
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
    off = plan(load_config(CONFIGS / "tiny.yaml", BASE), 1, setups=("full",))[0].activations
    on = plan(load_config(CONFIGS / "tiny.yaml", [*BASE, "enable_activation_checkpointing=true"]), 1, ("full",))[0]
    assert 0 < on.activations < off


def test_nf4_bytes_and_unbuildable_qlora_is_explained():
    w = torch.randn(128, 128, dtype=torch.bfloat16)
    assert tensor_bytes(to_nf4(w)) < 0.3 * tensor_bytes(w)  # 4 bits + block scalers, vs 16 bits
    (qlora,) = plan(load_config(CONFIGS / "tiny.yaml", BASE), 1, setups=("qlora",))
    assert "k_proj holds 128x64 weights" in qlora.note


def test_cli_prints_the_preview_table():
    out = subprocess.run([sys.executable, "-m", "docev.cli", "plan-memory", "--config",
                          str(CONFIGS / "docev_preview.yaml"), "--nnodes", "1", "--gpus-per-node", "8"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per-GPU memory (GiB), 8 GPU(s), dtype bf16" in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"full", "lora", "qlora"}
    assert float(rows["qlora"][1]) < float(rows["lora"][1]) and float(rows["lora"][2]) < float(rows["full"][2])
