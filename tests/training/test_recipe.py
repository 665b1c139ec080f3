"""The recipe end to end: `docev train` → torchrun, 2 processes, gloo, CPU fp32, on shards made by the real
data path (validate → preprocess) from the session's synthetic documents plus a text-only chat source.

The runs are shared by the assertions (each costs ~10 s on 2 cores):
- ``full``: 2 epochs = 14 steps uninterrupted, HF checkpoints (the reference of every comparison);
- ``split``: the same config stopped after 6 steps (``stop_after_steps``), then resumed to 14, logging to
  W&B (offline, no API key); HF checkpoints;
- ``split_dcp``: the same with DCP checkpoints, async until the stop, sync after the resume;
- the fault tests' own runs (per format): ``kill -9`` of rank 1 mid-run, then a restart that resumes from
  ``latest``; a rank killed while it writes a checkpoint (``slow_save_recipe.py`` holds the write open);
- the preemption test's own run: SIGTERM to ``docev train`` mid-epoch, then a restart (W&B offline);
- the precision test's two 3-step bf16 runs (fp32 and bf16 master weights), each exported in fp32.
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
from conftest import CONFIGS, small_tmpfs
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from docev.config import load_config
from docev.data.loader import build_dataset, build_sampler
from docev.export import export_checkpoint
from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.run.checkpoints import latest_checkpoint, prune_checkpoints
from docev.run.digests import CheckpointCorrupt, verify_checkpoint
from docev.training.metrics_log import read_metrics
from docev.training.parallelize import shard_condition
from docev.training.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # torchrun trainings, ~10 s each on 2 idle cores (`make test-fast` leaves them out)

CONFIG = CONFIGS / "tiny.yaml"
STEPS = 14  # 2 epochs × 7 steps (29 samples per epoch, 2 ranks × batch 2)
SAVE_EVERY = 4
STOP_AT = 6
REQUIRED = {"step", "loss", "lr", "grad_norm", "tokens_per_second", "tokens_per_second_per_gpu", "padding_share",
            "sampling_ratio"}  # fmt: skip


@pytest.fixture(scope="module")
def data(train_data) -> dict:
    """The session's validated + preprocessed training shards (tests/conftest.py), shared by every run through
    symlinks (test_peft's runs too)."""
    return train_data


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
        f"save_every_n_steps={SAVE_EVERY}", "keep_last_n_checkpoints=2", "checkpoint_format=hf", *extra,
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


@pytest.fixture(scope="module")
def split_dcp(data) -> dict:
    """``split`` with DCP checkpoints: async saves until the stop at step 6, sync after the resume."""
    out = _out(data, "split_dcp")
    stop = _train(
        _args(data, out, "checkpoint_format=dcp", "enable_async_checkpointing=true", f"stop_after_steps={STOP_AT}")
    )
    _ok(stop)
    latest = latest_checkpoint(out / "checkpoints")  # saved async: digested in the background writer
    stopped = {"latest": latest, "log": stop.stdout + stop.stderr, "manifest": verify_checkpoint(latest)}
    resumed = _train(_args(data, out, "checkpoint_format=dcp"))
    _ok(resumed)
    return {"out": out, "stopped": stopped, "resumed_log": resumed.stdout + resumed.stderr}


def _dcp_optimizer(folder: Path) -> dict:
    """The optimizer entries of a DCP folder, consolidated in this process (no process group)."""
    return _load_state_dict_from_keys({"optimizer"}, checkpoint_id=str(folder))["optimizer"]


def test_shard_units_are_decoder_layers_embedding_and_output():
    model = docev_tiny()
    names = {n for n, m in model.named_modules() if shard_condition(n, m)}
    assert names == {"tok_embeddings", "decoder.layers.0", "decoder.layers.1", "decoder.output"}


def test_hybrid_sharding_with_cross_node_reduction_and_a_dcp_resume_on_the_2d_mesh(data):
    """The recipe on 2 processes standing for 2 nodes × 1 rank (a 2-D mesh), 2 micro-batches a step: hybrid
    sharding with the cross-node all-reduce on the last micro-batch only, stopped after step 2 with async DCP
    saves and resumed from that sharded folder, repeats the losses and gradient norms of an uninterrupted
    full-sharding run (fp32; tolerance 1e-5 relative for sums in another order). The mesh is read from the log
    and from the run itself, and the cross-replica all-reduces are counted (count_reductions_recipe.py): one per
    FSDP unit per step, none before the last micro-batch — the losses alone would also match with the hybrid
    mesh switched off."""
    common = ["gradient_accumulation_steps=2", "epochs=1", "max_steps_per_epoch=3", "save_every_n_steps=2"]
    hybrid = ["train.nnodes=2", "train.nproc_per_node=1", "train.gradient_reduction=last_micro_batch_across_nodes",
              "checkpoint_format=dcp"]  # fmt: skip
    runs = {"ga_full": [["train.fsdp_strategy=full"]],
            "ga_hybrid": [[*hybrid, "enable_async_checkpointing=true", "stop_after_steps=2"], hybrid]}  # fmt: skip
    worker = str(Path(__file__).with_name("count_reductions_recipe.py"))
    rows, logs, counted = {}, {}, {}
    for name, attempts in runs.items():
        out = _out(data, name)
        for i, extra in enumerate(attempts):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   worker, *_args(data, out, *common, *extra)]  # fmt: skip
            env = {**_env(), "REDUCTIONS_OUT": str(out / f"reductions-{i}")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
            _ok(proc)
            logs[name, i] = proc.stdout + proc.stderr
            counted[name, i] = [json.loads((out / f"reductions-{i}.{r}").read_text()) for r in (0, 1)]
        rows[name] = read_metrics(out / "logs" / "metrics.jsonl")
    assert "FSDP mesh (shard=2): full sharding" in logs["ga_full", 0]
    for i in (0, 1):
        line = "FSDP mesh (replicate=2, shard=1): hybrid sharding, gradient reduction last_micro_batch_across_nodes"
        assert line in logs["ga_hybrid", i]
    for (name, i), ranks in counted.items():
        steps = {("ga_full", 0): 3, ("ga_hybrid", 0): 2, ("ga_hybrid", 1): 1}[name, i]
        for got in ranks:
            assert got["units"] == 5  # tok_embeddings, 2 decoder layers, output, the root
            if name == "ga_full":
                assert got["mesh"] == {"shard": 2} and got["reductions"] == [0] * steps
            else:
                assert got["mesh"] == {"replicate": 2, "shard": 1} and got["reductions"] == [5] * steps
    stopped = data["root"] / "ga_hybrid" / "checkpoints" / "step_2"
    assert len(list(stopped.glob("*.distcp"))) == 2  # a sharded folder, each rank's shards
    assert [r["step"] for r in rows["ga_hybrid"]] == [1, 2, 3] and len(rows["ga_full"]) == 3
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
    # W&B offline, one directory per run, both for the same W&B run: the id kept with the checkpoint
    offline = sorted((runs["split"] / "logs" / "wandb").glob("offline-run-*"))
    saved_id = torch.load(b / "recipe_state.pt", weights_only=True)["wandb_run_id"]
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {saved_id}


def test_exact_resume_from_dcp(runs, split_dcp):
    """Async DCP saves, a stop, a resume from DCP: the losses, weights and optimizer state of the uninterrupted
    HF run, bit for bit; each rank wrote its own shards, and recipe_state.pt holds neither model nor optimizer."""
    out = split_dcp["out"]
    assert split_dcp["stopped"]["latest"].name == f"step_{STOP_AT}"
    assert "Saving step_4 in the background" in split_dcp["stopped"]["log"]
    assert f"Resuming from {out / 'checkpoints' / f'step_{STOP_AT}'}" in split_dcp["resumed_log"]
    keys = ("step", "loss", "lr", "grad_norm", "num_tokens", "num_loss_tokens", "sampling_ratio", "tokens_seen")
    full = read_metrics(runs["full"] / "logs" / "metrics.jsonl")
    split = read_metrics(out / "logs" / "metrics.jsonl")
    assert [[r[k] for k in keys] for r in split] == [[r[k] for k in keys] for r in full]

    hf, dcp = runs["full"] / "checkpoints" / f"step_{STEPS}", out / "checkpoints" / f"step_{STEPS}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_12", f"step_{STEPS}"]
    shards = sorted(dcp.glob("*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"] and (dcp / ".metadata").is_file()
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 0.7 * sum(sizes)  # each rank wrote about its half, not the whole state
    wa, wb = _weights(hf), DocEVCheckpointer(dcp).load_hf_state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = torch.load(hf / "recipe_state.pt", weights_only=True)["optimizer"]["state"], _dcp_optimizer(dcp)["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[p][k], ob[p][k]) for p in oa for k in oa[p])
    recipe = torch.load(dcp / "recipe_state.pt", weights_only=True)
    expected = {
        "lr_scheduler",
        "sampler",
        "rng",
        "global_step",
        "tokens_seen",
        "seed",
        "world_size",
        "wandb_run_id",
        "schedule",
    }
    assert recipe.keys() == expected
    assert recipe["global_step"] == STEPS and len(recipe["rng"]) == 2


def test_export_from_dcp_is_bit_exact(runs, split_dcp, data, tmp_path):
    """``docev export`` of the DCP step_14 writes the same bytes as the export of the HF step_14."""
    folders = {}
    for name, root in (("hf", runs["full"]), ("dcp", split_dcp["out"])):
        folders[name] = tmp_path / name
        export_checkpoint(data["cfg"], str(root / "checkpoints" / f"step_{STEPS}"), str(folders[name]))
    files = sorted(p.name for p in folders["hf"].glob("model-*.safetensors"))
    assert files and files == sorted(p.name for p in folders["dcp"].glob("model-*.safetensors"))
    for name in [*files, "model.safetensors.index.json", "config.json", "tokenizer.json"]:  # README: paths differ
        assert (folders["hf"] / name).read_bytes() == (folders["dcp"] / name).read_bytes(), name
    assert not any(p.suffix == ".distcp" or p.name == ".metadata" for p in folders["dcp"].iterdir())


def test_two_rank_dcp_checkpoint_resumes_on_one_rank(data, split_dcp):
    """DCP reshards the 2-rank step_14 onto 1 rank: the frozen encoder comes back bit for bit, one more step
    moves the trained weights by about one AdamW update, and the run says its samples now differ."""
    out = _out(data, "one_rank")
    shutil.copytree(split_dcp["out"] / "checkpoints", out / "checkpoints")
    proc = _train(_args(data, out, "checkpoint_format=dcp", "train.nproc_per_node=1", f"stop_after_steps={STEPS + 1}"))
    _ok(proc)
    log = proc.stdout + proc.stderr
    assert f"Resuming from {out / 'checkpoints' / f'step_{STEPS}'}" in log
    assert "Resuming on 1 ranks from a 2-rank checkpoint" in log
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    assert (
        rows[-1]["step"] == STEPS + 1
        and 0 < rows[-1]["loss"] < read_metrics(split_dcp["out"] / "logs" / "metrics.jsonl")[0]["loss"] - 1.0
    )
    new = out / "checkpoints" / f"step_{STEPS + 1}"
    assert [p.name for p in new.glob("*.distcp")] == ["__0_0.distcp"]
    before, after = (
        DocEVCheckpointer(f).load_hf_state_dict() for f in (split_dcp["out"] / "checkpoints" / f"step_{STEPS}", new)
    )
    frozen = [k for k in before if k.startswith("vision_tower.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert 0 < (after[q] - before[q]).abs().max() <= 3 * rows[-1]["lr"]


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


@pytest.mark.parametrize("fmt", ["hf", "dcp"])
def test_kill_rank_mid_run_then_resume(data, runs, fmt):
    out = _out(data, f"fault_{fmt}")
    # Activation checkpointing recomputes the same ops: the losses before the kill equal the full run's.
    args = _args(data, out, "enable_activation_checkpointing=true", f"checkpoint_format={fmt}")
    cmd = [sys.executable, "-m", "docev.cli", "train", *args]
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

    restart = _train(_args(data, out, f"checkpoint_format={fmt}"))
    _ok(restart)
    assert f"Resuming from {out / 'checkpoints' / f'step_{saved}'}" in restart.stdout + restart.stderr
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # steps after `saved` were redone, once
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]


def test_nan_loss_stops_every_rank_naming_the_samples(data):
    """In bf16 (CPU allows it): the steps before the failure train and save bf16 weights."""
    out = _out(data, "nan")
    # lr 1e30 after the warmup's first step: step 2 moves every weight by ~1e30, step 3's loss is NaN.
    args = ("dtype=bf16", "master_dtype=bf16", "optimizer.lr=1e30", "clip_grad_norm=null", "save_every_n_steps=1")
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


SLOW_SAVE = Path(__file__).with_name("slow_save_recipe.py")


@pytest.mark.parametrize("fmt", ["hf", "dcp", "dcp_async"])
def test_kill_rank_while_it_saves_keeps_the_previous_checkpoint(data, tmp_path, fmt):
    """The save of step 8 (after those of step 4 and of the epoch end, step 7) is held open on the writing
    rank (rank 0 for hf, rank 1 for dcp) and that rank is killed mid-write; an async save is killed only after
    training went on past it. ``latest`` still names step 7, which loads, and pruning removes the partial
    folder."""
    out = _out(data, f"save_kill_{fmt}")
    marker = tmp_path / "holding"
    extra = {"hf": [], "dcp": ["checkpoint_format=dcp"],
             "dcp_async": ["checkpoint_format=dcp", "enable_async_checkpointing=true"]}[fmt]  # fmt: skip
    env = _env() | {"SLOW_SAVE_STEP": str(2 * SAVE_EVERY), "SLOW_SAVE_RANK": "0" if fmt == "hf" else "1",
                    "SLOW_SAVE_MARKER": str(marker)}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(SLOW_SAVE), *_args(data, out, *extra)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = out / "logs" / "metrics.jsonl"
    try:
        while not marker.exists() or (fmt == "dcp_async" and len(read_metrics(metrics)) <= 2 * SAVE_EVERY):
            assert proc.poll() is None, "the run ended before the save could be killed"
            time.sleep(0.02)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in log, log[-3000:]
    ckpts = out / "checkpoints"
    partial = ckpts / f".step_{2 * SAVE_EVERY}.partial"
    assert partial.is_dir() and not (ckpts / f"step_{2 * SAVE_EVERY}").exists()
    assert any(p.suffix in (".safetensors", ".distcp") for p in partial.iterdir())  # killed mid-write
    latest = latest_checkpoint(ckpts)
    assert latest.name == f"step_{STEPS // 2}"
    state = DocEVCheckpointer(latest).load_checkpoint()
    assert state["global_step"] == STEPS // 2 and len(state["rng"]) == 2
    assert prune_checkpoints(ckpts, keep=2) == [partial]  # the resumed run starts clean
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", f"step_{SAVE_EVERY}", f"step_{STEPS // 2}"]


_KILL_SCRIPT = """
import os, signal, sys
from docev.models.docev import DocEVCheckpointer
from docev.run import publish
src, out = sys.argv[1:]
# the folder is renamed into place, `latest` not yet moved
original = publish.os.replace

def replace(a, b):
    if str(a).endswith(".latest.tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    original(a, b)
publish.os.replace = replace
ckpt = DocEVCheckpointer(src, output_dir=out)
ckpt.save_checkpoint(ckpt.load_checkpoint(), 15)
"""


def test_kill_between_folder_and_pointer_keeps_the_previous_one(runs, tmp_path):
    out = tmp_path / "checkpoints"
    shutil.copytree(runs["full"] / "checkpoints", out)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(out / f"step_{STEPS}"), str(out)], env=_env())
    assert proc.returncode == -signal.SIGKILL
    left = [out / ".latest.tmp", out / "step_15"]
    assert all(p.exists() for p in left)
    latest = latest_checkpoint(out)
    assert latest.name == f"step_{STEPS}"
    assert DocEVCheckpointer(latest).load_checkpoint()["global_step"] == STEPS
    assert prune_checkpoints(out, keep=2) == left  # the resumed run starts clean
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_12", f"step_{STEPS}"]


def test_sigterm_saves_the_step_in_flight_and_the_restart_loses_nothing(data, runs):
    """The real path: SIGTERM to the `docev train` process (torchrun's launcher), which forwards it to both ranks."""
    out = _out(data, "preempt")
    wandb = ["metric_logger._component_=torchtune.training.metric_logging.WandBLogger",
             "metric_logger.project=docev-test", f"metric_logger.log_dir={out / 'logs'}"]  # fmt: skip
    cmd = [sys.executable, "-m", "docev.cli", "train", *_args(data, out, *wandb)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    metrics = out / "logs" / "metrics.jsonl"
    try:
        while not read_metrics(metrics):
            assert proc.poll() is None, "the run ended before it could be signalled"
            time.sleep(0.02)
        seen = len(read_metrics(metrics))
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-4000:]
    assert "[rank0]: got SIGTERM" in log and "[rank1]: got SIGTERM" in log
    rows = read_metrics(metrics)
    saved = rows[-1]["step"]
    assert seen <= saved <= seen + 1 < SAVE_EVERY  # the step in flight, not a scheduled save
    ckpts = out / "checkpoints"
    assert latest_checkpoint(ckpts).name == f"step_{saved}"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", f"step_{saved}"]
    assert DocEVCheckpointer(ckpts / f"step_{saved}").load_checkpoint()["global_step"] == saved

    restart = _train(_args(data, out, *wandb))
    _ok(restart)
    assert f"Resuming from {ckpts / f'step_{saved}'}" in restart.stdout + restart.stderr
    full = read_metrics(runs["full"] / "logs" / "metrics.jsonl")
    rows = read_metrics(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # 0 steps lost, none repeated
    assert [r["loss"] for r in rows] == [r["loss"] for r in full]
    offline = sorted((out / "logs" / "wandb").glob("offline-run-*"))
    saved_id = torch.load(latest_checkpoint(ckpts) / "recipe_state.pt", weights_only=True)["wandb_run_id"]
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {saved_id}  # one W&B run


def _bf16_copy(src: Path, dst: Path) -> Path:
    """The tiny base stored in bf16, as the preview's base is: fp32 master weights hold it exactly."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    return dst


def test_fp32_master_weights_keep_the_updates_bf16_rounds_away(data, tmp_path):
    """bf16 compute, lr 1e-5, 3 steps, exported in fp32: the share of decoder-layer elements that differ
    from the (bf16) base. With fp32 master weights every trained element moves; in pure bf16 an update of
    ~1e-5 is below half an ulp of any weight with |w| ≳ 0.003, so most stay at the base's bits."""
    base = _bf16_copy(data["checkpoint"], tmp_path / "base-bf16")
    base_sd = _weights(base)
    shares = {}
    for master in ("fp32", "bf16"):
        out = _out(data, f"master-{master}")
        args = _args(data, out, f"checkpointer.checkpoint_dir={base}", "dtype=bf16", f"master_dtype={master}",
                     "optimizer.lr=1e-5", "epochs=1", "max_steps_per_epoch=3", "export.dtype=fp32")  # fmt: skip
        proc = _train(args)
        _ok(proc)
        assert ("master_dtype: bf16 with optimizer.lr 1e-05" in proc.stdout + proc.stderr) == (master == "bf16")
        stored = {v.dtype for k, v in _weights(latest_checkpoint(out / "checkpoints")).items() if ".head." not in k}
        assert stored == {torch.float32 if master == "fp32" else torch.bfloat16}  # checkpoints hold the master
        result = export_checkpoint(load_config(CONFIG, args[2:]), "latest", str(out / "export"))
        exported = _weights(Path(result.destination))
        keys = [k for k in exported if k.startswith("language_model.model.layers.")]
        assert keys and all(exported[k].dtype == torch.float32 for k in keys)
        changed = sum(int((exported[k] != base_sd[k].float()).sum()) for k in keys)
        shares[master] = changed / sum(exported[k].numel() for k in keys)
        frozen = [k for k in exported if k.startswith("vision_tower.")]
        assert all(torch.equal(exported[k], base_sd[k].float()) for k in frozen)  # frozen: the base's bits
    print(f"decoder-layer elements changed after 3 steps at lr 1e-5: fp32 master {shares['fp32']:.1%}, "
          f"bf16 {shares['bf16']:.1%}")  # fmt: skip
    assert shares["fp32"] >= 0.9 and shares["bf16"] < shares["fp32"] / 2, shares


@pytest.mark.parametrize("fmt", ["hf", "dcp"])
def test_every_file_of_a_training_checkpoint_is_digested(runs, split_dcp, tmp_path, fmt):
    """Each kind of file of a 2-rank step folder (shards of each rank, .metadata or index, recipe state, config,
    tokenizer files), one bit flipped or cut in half, is caught by the check resume runs; the async save's
    folder was sealed with both ranks' shards."""
    src = (runs["full"] if fmt == "hf" else split_dcp["out"]) / "checkpoints" / f"step_{STEPS}"
    folder = tmp_path / f"step_{STEPS}"
    shutil.copytree(src, folder)
    names = sorted(verify_checkpoint(folder)["files"])
    kinds = {"hf": {"model-00001-of-00001.safetensors", "model.safetensors.index.json"},
             "dcp": {"__0_0.distcp", "__1_0.distcp", ".metadata"}}[fmt]  # fmt: skip
    assert kinds | {"recipe_state.pt", "config.json", "tokenizer.json"} <= set(names)
    for name in names:
        path = folder / name
        original = path.read_bytes()
        for damaged in (original[:-1] + bytes([original[-1] ^ 0x80]), original[: len(original) // 2]):
            path.write_bytes(damaged)
            with pytest.raises(CheckpointCorrupt, match=f"does not verify: {re.escape(name)}: "):
                verify_checkpoint(folder)
        path.write_bytes(original)
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(split_dcp["stopped"]["manifest"]["files"])


@pytest.mark.parametrize("fmt", ["hf", "dcp"])
def test_a_corrupt_latest_is_refused_or_skipped(data, runs, split_dcp, fmt):
    """latest (step 14) with a flipped bit (hf weights) or a truncated rank-1 shard (dcp): ``true`` refuses naming
    the file; ``auto`` says on both ranks and in the metrics that it falls back to step 12, and ends with the
    weights of the uninterrupted run (which exact resume from step 12 reproduces)."""
    src = runs["full"] if fmt == "hf" else split_dcp["out"]
    out = _out(data, f"corrupt_{fmt}")
    shutil.copytree(src / "checkpoints", out / "checkpoints")
    latest, previous = (out / "checkpoints" / f"step_{s}" for s in (STEPS, 12))
    if fmt == "hf":
        victim = latest / "model-00001-of-00001.safetensors"
        data_ = bytearray(victim.read_bytes())
        data_[len(data_) // 2] ^= 0x04
        victim.write_bytes(bytes(data_))
    else:
        victim = latest / "__1_0.distcp"
        victim.write_bytes(victim.read_bytes()[:-4096])
    extra = [f"checkpoint_format={fmt}"]
    refused = _train(_args(data, out, *extra, "resume_from_checkpoint=true"))
    assert refused.returncode != 0
    assert f"checkpoint {latest} does not verify: {victim.name}: " in refused.stdout + refused.stderr

    resumed = _train(_args(data, out, *extra))
    _ok(resumed)
    log = resumed.stdout + resumed.stderr
    assert log.count(f"falling back to {previous}, the newest checkpoint that verifies") == 2, log[-3000:]
    rows = read_metrics(out / "logs" / "metrics.jsonl")
    assert rows[0]["event"] == "resume_fallback" and rows[0]["step"] == 12 and rows[0]["corrupt"] == str(latest)
    assert [r["step"] for r in rows[1:]] == [13, 14]
    want = DocEVCheckpointer(src / "checkpoints" / f"step_{STEPS}").load_hf_state_dict()
    got = DocEVCheckpointer(latest).load_hf_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_disk_full_is_named_and_a_restart_does_not_retrain(data, tmp_path):
    """checkpointer.output_dir on a 12 MB tmpfs (one tiny HF checkpoint is ~8 MB): training warns that two do not
    fit, the save of step 4 fits, the next one runs out of space and names the folder, the bytes needed and free;
    the restart, the disk still full, resumes step 4 and refuses before it trains a step or rewrites a log line."""
    with small_tmpfs(tmp_path / "small", "12m") as mnt:
        out = _out(data, "disk_full")
        args = _args(data, out, f"checkpointer.output_dir={mnt}", "epochs=1")
        first = _train(args)
        log = first.stdout + first.stderr
        assert first.returncode != 0
        need = r"~7,77\d,\d\d\d bytes \(0\.01 GB\)"  # (742,208 weights + 2 x 600,320 moments) x 4 bytes
        assert re.search(rf"room for one checkpoint of {need} but not two", log), log[-3000:]
        assert re.search(rf"DiskSpaceError: \[Errno 28\] writing {mnt}/\.step_\d+\.partial: no space left: it "
                         rf"needs {need}, [\d,]+ bytes \(0\.00 GB\) free", log), log[-3000:]  # fmt: skip
        assert latest_checkpoint(mnt).name == f"step_{SAVE_EVERY}"
        logged = (out / "logs" / "metrics.jsonl").read_text()

        restart = _train(args)
        log = restart.stdout + restart.stderr
        assert restart.returncode != 0
        assert re.search(rf"checkpointer.output_dir {mnt}: [\d,]+ bytes \(0\.00 GB\) free, one checkpoint needs "
                         rf"{need}; .* training did not start", log), log[-3000:]  # fmt: skip
        assert (out / "logs" / "metrics.jsonl").read_text() == logged  # no step trained, no line rewritten
        assert not any(p.name.endswith(".partial") for p in mnt.iterdir())  # the resume pruned the failed save
