"""The recipe end to end: `docev train` → torchrun, 2 processes, gloo, CPU fp32, on shards made by the real
data path (validate → preprocess) from the session's synthetic documents plus a text-only chat source.

The runs are shared by the assertions (each costs ~10 s on 2 cores):
- ``full``: 2 epochs = 14 steps uninterrupted;
- ``split``: the same config stopped after 6 steps (``stop_after_steps``), then resumed to 14, logging to
  W&B (offline, no API key);
- the fault test's own run: ``kill -9`` of rank 1 mid-run, then a restart that resumes from ``latest``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, tiny_config
from safetensors.torch import load_file

from docev.data.loader import build_dataset, build_sampler
from docev.data.preprocess import run_preprocess
from docev.models.docev import DocEVCheckpointer, docev_tiny, latest_checkpoint
from docev.training.metrics import read_metrics
from docev.validate.runner import run_validate

CONFIG = CONFIGS / "tiny.yaml"
STEPS = 14  # 2 epochs × 7 steps (29 samples per epoch, 2 ranks × batch 2)
SAVE_EVERY = 4
STOP_AT = 6
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "tokens_per_second_per_gpu", "padding_share",
            "sampling_ratio"}  # fmt: skip
CHATS = [
    ("What is the capital of France?", "Paris."),
    ("Name a prime number.", "Seven."),
    ("Spell 'cat' backwards.", "tac"),
    ("What colour is a clear sky?", "Blue."),
    ("How many legs has a spider?", "Eight."),
    ("What is two plus two?", "Four."),
    ("Which is larger, 7 or 9?", "Nine."),
    ("Say hello.", "Hello!"),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint, synth_sources) -> dict:
    """Validated + preprocessed shards, shared by every run through symlinks."""
    root = tmp_path_factory.mktemp("train")
    text = root / "text"
    text.mkdir()
    with (text / "chat.jsonl").open("w") as f:
        for i, (q, a) in enumerate(CHATS):
            context = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"id": f"txt-{i}", "context": context, "image_files": []}) + "\n")
    datasets = [
        {"source": str(synth_sources["instruct"]), "name": "instruct"},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
         "context_col": "text", "weight": 0.25},
        {"source": str(text), "name": "text"},
    ]  # fmt: skip
    base = root / "base"
    cfg = tiny_config(base, tiny_checkpoint, datasets)
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    return {"root": root, "base": base, "datasets": datasets, "checkpoint": tiny_checkpoint, "cfg": cfg}


def _out(data: dict, name: str) -> Path:
    out = data["root"] / name
    out.mkdir()
    for step in ("validate", "shards"):
        (out / step).symlink_to(data["base"] / step)
    return out


def _args(data: dict, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(CONFIG), f"output_dir={out}", f"tokenizer.model_name_or_path={data['checkpoint']}",
        "synthetic=null", f"datasets={json.dumps(data['datasets'])}", "epochs=2",
        f"save_every_n_steps={SAVE_EVERY}", "keep_last_n_checkpoints=2", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    env.pop("RANK", None)
    return env


def _train(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "docev.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def runs(data) -> dict:
    full = _out(data, "full")
    _ok(_train(_args(data, full)))
    split = _out(data, "split")
    wandb = ["metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
             "metric_logger.project=docev-test", f"metric_logger.log_dir={split / 'logs'}"]  # fmt: skip
    _ok(_train(_args(data, split, f"stop_after_steps={STOP_AT}", *wandb)))
    stopped = {
        "latest": latest_checkpoint(split / "checkpoints"),
        "steps": [r["step"] for r in read_metrics(split / "logs" / "metrics.jsonl")],
    }
    resumed = _train(_args(data, split, *wandb))
    _ok(resumed)
    return {"full": full, "split": split, "stopped": stopped, "resumed_log": resumed.stdout + resumed.stderr}


def test_hybrid_sharding_with_cross_node_reduction_on_the_last_micro_batch(data):
    """The recipe on 2 processes standing for 2 nodes × 1 rank, 2 micro-batches a step: hybrid sharding with
    the cross-node all-reduce on the last micro-batch only repeats full sharding's losses and gradient norms
    (fp32; tolerance 1e-5 relative for sums in another order)."""
    rows = {}
    modes = {"ga_full": ["train.fsdp_strategy=full"],
             "ga_hybrid": ["train.nnodes=2", "train.nproc_per_node=1",
                           "train.gradient_reduction=last_micro_batch_across_nodes"]}  # fmt: skip
    for name, extra in modes.items():
        out = _out(data, name)
        args = _args(data, out, "gradient_accumulation_steps=2", "epochs=1", "max_steps_per_epoch=3", *extra)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "docev.training.recipe", *args]  # fmt: skip
        _ok(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=240))
        rows[name] = read_metrics(out / "logs" / "metrics.jsonl")
    assert len(rows["ga_full"]) == len(rows["ga_hybrid"]) == 3
    for key in ("loss", "grad_norm"):
        got, want = ([r[key] for r in rows[n]] for n in ("ga_hybrid", "ga_full"))
        assert got == pytest.approx(want, rel=1e-5)


def _plans(cfg, epoch: int) -> tuple[object, list]:
    """Per step of the epoch, the (index, ratio, row) triples of rank 0 and rank 1."""
    dataset = build_dataset(cfg)
    samplers = [build_sampler(cfg, dataset, rank=r, world_size=2) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(epoch)
    return dataset, list(zip(*samplers, strict=True))


def test_plan_has_steps_where_only_one_rank_sees_images(data):
    """The case that needs the root-unit vision path and zero gradients for unused parameters."""
    dataset, steps = _plans(data["cfg"], 0)
    text_rows = {i for i in range(len(dataset)) if dataset.source_indices()[i] == 2}
    mixed = [s for s, (a, b) in enumerate(steps)
             if ({i for i, _, _ in a} <= text_rows) != ({i for i, _, _ in b} <= text_rows)]  # fmt: skip
    assert len(steps) == STEPS // 2 and mixed


def test_loss_falls_and_outputs_are_written(runs, data):
    full = runs["full"]
    rows = read_metrics(full / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r.keys() >= REQUIRED for r in rows)
    losses = [r["loss"] for r in rows]
    assert sum(losses[:3]) / 3 - sum(losses[-3:]) / 3 > 1.0, losses
    for r in rows:
        assert 0 <= r["padding_share"] < 1 and r["sampling_ratio"] in (2, 3) and r["tokens_per_second"] > 0
        assert r["tokens_per_second_per_gpu"] == pytest.approx(r["tokens_per_second"] / 2)
        assert not any(k.startswith("peak_memory") for k in r)  # CUDA only
    assert rows[1]["lr"] > rows[0]["lr"] == 0.0  # warmup, then cosine decay
    tiles = []
    for epoch in (0, 1):
        dataset, steps = _plans(data["cfg"], epoch)
        grids = [[g for part in step for i, _, _ in part for g in dataset[i]["image_grids"]] for step in steps]
        tiles += [sum(1 + r * c for r, c in step) for step in grids]
    assert [r["num_tiles"] for r in rows] == tiles
    assert (full / "logs" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpts = full / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_12", "step_14"]
    state = DocEVCheckpointer(latest_checkpoint(ckpts)).load_checkpoint()
    assert state["global_step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["sampler"] == {"epoch": 1, "step": STEPS // 2, "seed": 0}
    assert state["tokens_seen"] == sum(r["num_tokens"] for r in rows)

    base = DocEVCheckpointer(data["checkpoint"]).load_checkpoint()["model"]
    model = docev_tiny()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {k for k in base if k.startswith("encoder.")}
    assert all(torch.equal(state["model"][k], base[k]) for k in frozen)  # the vision tower is frozen
    assert not torch.equal(
        state["model"]["decoder.layers.0.attn.q_proj.weight"], base["decoder.layers.0.attn.q_proj.weight"]
    )
    assert set(state["optimizer"]["state"]) == trainable  # frozen groups are not in the optimizer


def test_exact_resume(runs):
    """Stopped after 6 steps and resumed to 14: the same per-step losses, lr and gradient norms and the same
    final weights and optimizer state, bit for bit (CPU fp32, deterministic ops, fixed reduction order)."""
    assert runs["stopped"]["latest"].name == f"step_{STOP_AT}"
    assert runs["stopped"]["steps"] == list(range(1, STOP_AT + 1))
    assert f"Resuming from {runs['split'] / 'checkpoints' / f'step_{STOP_AT}'}" in runs["resumed_log"]
    full = read_metrics(runs["full"] / "logs" / "metrics.jsonl")
    split = read_metrics(runs["split"] / "logs" / "metrics.jsonl")
    keys = ("step", "loss", "lr", "grad_norm", "num_tokens", "num_loss_tokens", "sampling_ratio", "tokens_seen")
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in full]

    a, b = (r / "checkpoints" / f"step_{STEPS}" for r in (runs["full"], runs["split"]))
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (torch.load(f / "recipe_state.pt", weights_only=True)["optimizer"]["state"] for f in (a, b))
    assert all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])
    assert len(list((runs["split"] / "logs" / "wandb").glob("offline-run-*"))) == 2  # W&B offline, once per run


def _worker(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker with this RANK (torchrun's children carry it in their environment)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(d.name)
    raise AssertionError(f"no rank {rank} among the children of {launcher}")


def test_kill_rank_mid_run_then_resume(data, runs):
    out = _out(data, "fault")
    # Activation checkpointing recomputes the same ops: the losses before the kill equal the full run's.
    cmd = [sys.executable, "-m", "docev.cli", "train", *_args(data, out, "enable_activation_checkpointing=true")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    metrics = out / "logs" / "metrics.jsonl"
    try:
        while latest_checkpoint(out / "checkpoints") is None or len(read_metrics(metrics)) < SAVE_EVERY + 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(_worker(proc.pid, 1), signal.SIGKILL)  # docev train exec'd torchrun: proc.pid is the launcher
        killed = time.monotonic()
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed < 60, log[-3000:]
    assert "Signal 9 (SIGKILL)" in log
    saved = int(latest_checkpoint(out / "checkpoints").name.removeprefix("step_"))
    before, full = read_metrics(metrics), read_metrics(runs["full"] / "logs" / "metrics.jsonl")
    logged = before[-1]["step"]
    assert STEPS > logged >= saved and logged - saved <= SAVE_EVERY
    assert [r["loss"] for r in before] == [r["loss"] for r in full[:logged]]

    restart = _train(_args(data, out))
    _ok(restart)
    assert f"Resuming from {out / 'checkpoints' / f'step_{saved}'}" in restart.stdout + restart.stderr
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # steps after `saved` were redone, once
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]


def test_nan_loss_stops_every_rank_naming_the_samples(data):
    """In bf16 (CPU allows it): the steps before the failure train and save bf16 weights."""
    out = _out(data, "nan")
    # lr 1e30 after the warmup's first step: step 2 moves every weight by ~1e30, step 3's loss is NaN.
    args = ("dtype=bf16", "optimizer.lr=1e30", "clip_grad_norm=null", "save_every_n_steps=1")
    proc = _train(_args(data, out, *args))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for rank in (0, 1):  # every rank stops at the same step
        assert re.search(rf"\[rank{rank}\]: \S*NonFiniteLossError: step 3: loss is (nan|inf)", log), log[-4000:]
    assert "rank 0: [[" in log and "rank 1: [[" in log and "doc-0000" in log
    latest = latest_checkpoint(out / "checkpoints")
    assert latest.name == "step_2"
    state = DocEVCheckpointer(latest).load_checkpoint()
    assert state["global_step"] == 2 and json.loads((latest / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {v.dtype for v in state["model"].values()} == {torch.bfloat16}
    stored = {k: v.dtype for k, v in _weights(latest).items() if ".head." not in k}  # SigLIP head: carried as is
    assert set(stored.values()) == {torch.bfloat16}


_KILL_SCRIPT = """
import os, signal, sys
from docev.models.docev import DocEVCheckpointer, _checkpointer
where, src, out = sys.argv[1:]
if where == "shards":  # after the first weights file of the new folder is written
    original = _checkpointer.assets.save_sharded
    def save_sharded(*args, **kwargs):
        original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    _checkpointer.assets.save_sharded = save_sharded
else:  # the folder is renamed into place, `latest` not yet moved
    original = _checkpointer.os.replace
    def replace(a, b):
        if str(a).endswith(".latest.tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        original(a, b)
    _checkpointer.os.replace = replace
ckpt = DocEVCheckpointer(src, output_dir=out)
ckpt.save_checkpoint(ckpt.load_checkpoint(), 15)
"""


@pytest.mark.parametrize("where", ["shards", "pointer"])
def test_kill_during_checkpoint_write_keeps_the_previous_one(runs, tmp_path, where):
    from docev.training.checkpointing import prune_checkpoints

    out = tmp_path / "checkpoints"
    shutil.copytree(runs["full"] / "checkpoints", out)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, where, str(out / f"step_{STEPS}"), str(out)], env=_env())
    assert proc.returncode == -signal.SIGKILL
    left = {"shards": [out / ".step_15.partial"], "pointer": [out / ".latest.tmp", out / "step_15"]}[where]
    assert all(p.exists() for p in left)
    latest = latest_checkpoint(out)
    assert latest.name == f"step_{STEPS}"
    assert DocEVCheckpointer(latest).load_checkpoint()["global_step"] == STEPS
    assert prune_checkpoints(out, keep=2) == left  # the resumed run starts clean
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_12", f"step_{STEPS}"]
