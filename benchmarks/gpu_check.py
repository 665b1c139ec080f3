"""The Python half of ``benchmarks/gpu_check.sh``: preflight, the packed training run's data, config and report,
and the JSON summary (stages 3 to 5 are ``gpu_kernels.py``).

Model: SigLIP so400m widths with 3 layers (2 run: features come from the second-to-last layer), LDPv2 at
1152 → 4096 → 4096, and 4 Solar-mini decoder layers (4096 wide, 32 heads, 8 KV heads, MLP 14336) with the
real vocabulary: 64000 + 64 fusion rows, so the embedding and the chunked output projection are 64064 × 4096.
The tokenizer is the tiny one (a 64k BPE cannot be trained offline): ids use its first 1088 rows, which
changes no shape or FLOP. ``--dry-run`` (``GPU_CHECK_TOY=1``): the tiny model on CPU, every stage at toy size.

**MFU**, one definition for packed and unpacked rows (``model_flops``): decoder ``6·N·tokens`` plus attention
``12·L·d`` per query-key pair the model attends (``attention_pairs`` of the metrics: n(n+1)/2 per document of n
real tokens; not what a kernel computes besides, flex's partly masked 128 × 128 blocks or SDPA's padded tail,
which would flatter one run against the other); the frozen vision tower forward only
(``2·N·p`` + ``4·L·p²·d`` per tile, p patches); the trainable connector MLP ``6·N·p`` per tile.
Activation-checkpointing recompute is not counted (the usual MFU convention). Divided by the device's spec
bf16 peak and by its measured bf16 matmul peak (stage 5). The seconds are the recipe's ``step_seconds``.

    python benchmarks/gpu_check.py preflight WORKDIR
    python benchmarks/gpu_check.py prepare WORKDIR STEPS
    python benchmarks/gpu_check.py report WORKDIR TRAIN_LOG
    python benchmarks/gpu_check.py summary WORKDIR
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from docev.models.docev import DocEVArch, DocEVModel, docev_from_arch, preview, tiny

ROOT = Path(__file__).resolve().parents[1]
TOY = os.environ.get("GPU_CHECK_TOY") == "1"
PACKED = ["dataloader.packed=true", "dataloader.bucket_by_length=false", "dataloader.pad_to_multiple_of=null"]
# dense bf16 peaks of the spec sheets (no sparsity), by the start of torch.cuda.get_device_name()
SPEC_BF16_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
# tokens/s/GPU (and pip names) the check reports versions of
CARRIED = ("torchtune", "torchao", "torchdata", "datasets", "omegaconf", "pydantic", "pydantic_core")
STAGES = ("preflight", "train", "layers", "host_syncs", "mfu")


def arch() -> DocEVArch:
    """The model of the check: the reduced-depth real widths, or the tiny one in a dry run."""
    return tiny() if TOY else replace(preview(), vision_layers=3, layers=4)


def docev_reduced(**kwargs: Any) -> DocEVModel:
    """``model._component_`` of the check: the builder of docev_preview/docev_tiny at ``arch()``."""
    return docev_from_arch(arch(), **kwargs)


def out_dir(work: Path) -> Path:
    out = Path(os.environ.get("GPU_CHECK_OUT") or work / "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def record(work: Path, stage: str, result: dict[str, Any]) -> None:
    """Merge one stage's result into ``$OUT/gpu_check.json`` (written after every stage: a timeout keeps the
    stages done) and print it."""
    path = out_dir(work) / "gpu_check.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[stage] = result
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(f"[gpu_check] {stage}: " + json.dumps(result, default=str), flush=True)


def device() -> torch.device:
    return torch.device("cpu" if TOY else "cuda")


def preflight(work: Path) -> None:
    """Versions, device, the recipe's imports and the torch APIs it uses (stage 1)."""
    from importlib.metadata import PackageNotFoundError, version

    start = time.perf_counter()
    import docev.training.recipe  # noqa: F401  (the recipe and everything it imports)
    from docev.training.preflight import missing_torch_apis

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", *CARRIED):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    dev = device()
    info: dict[str, Any] = {"device": str(dev), "toy": TOY}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info |= {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": list(torch.cuda.get_device_capability(dev)), "cuda": torch.version.cuda}  # fmt: skip
    missing = missing_torch_apis()
    ok = not missing and (dev.type != "cuda" or torch.cuda.is_available())
    record(work, "preflight", {"ok": ok, "versions": versions, **info, "missing_torch_apis": missing,
                               "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    if not ok:
        raise SystemExit(f"preflight failed: missing torch APIs {missing}")


def prepare(work: Path, steps: int) -> Path:
    """Checkpoint (tiny tokenizer + the check's weights), synthetic pages, the packed run's config."""
    from docev.assets import init_checkpoint, init_weights
    from docev.config import load_config
    from docev.models.docev import hf_config
    from docev.models.docev._folder import save_sharded
    from docev.synth import synth_data

    a = arch()
    ckpt = work / "ckpt"
    config_path = ckpt / "config.json"
    if not config_path.exists() or json.loads(config_path.read_text())["text_config"]["hidden_size"] != a.dim:
        shutil.rmtree(ckpt, ignore_errors=True)
        init_checkpoint(ckpt, size="tiny", seed=0)  # tokenizer, chat template, generation config
        if not TOY:
            for f in [*ckpt.glob("model-*.safetensors"), ckpt / "model.safetensors.index.json"]:
                f.unlink()
            save_sharded({k: v.to(torch.bfloat16) for k, v in init_weights(a).items()}, ckpt, 2 * 10**9)
            config = hf_config(a)
            config["torch_dtype"] = "bfloat16"
            config_path.write_text(json.dumps(config, indent=2))
            pre = json.loads((ckpt / "preprocessor_config.json").read_text())
            pre["size"] = pre["crop_size"] = {"height": a.tile_size, "width": a.tile_size}
            pre["image_grid_pinpoints"] = config["image_grid_pinpoints"]
            (ckpt / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    records = 8 if TOY else 96
    if not (work / "synth" / "instruct").exists():
        synth_data(work / "synth", records, seed=0, fmt="jsonl", workers=2 if TOY else 8)

    datasets = [{"source": str(work / "synth" / "instruct"), "name": "instruct"},
                {"source": str(work / "synth" / "pretrain"), "name": "pretrain", "ufx_type": "pretrain",
                 "context_col": "text"}]  # fmt: skip
    run = work / "run"
    logger = {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(run / "logs")}
    toy = ["device=cpu", "dtype=fp32", "compile=false", "model.attention=sdpa", "tokenizer.max_seq_len=1024",
           "tokenizer.tile_size=112", "enable_async_checkpointing=false", "dataloader.num_workers=0",
           "dataloader.pin_memory=false", "validate.workers=1", "preprocess.workers=1"]  # fmt: skip
    gpu = ["model.attention=flex", "dataloader.num_workers=4", "validate.workers=8", "preprocess.workers=8"]
    cfg = load_config(ROOT / "configs" / "docev_preview.yaml", [
        f"output_dir={run}", "model._component_=gpu_check.docev_reduced", f"model.image_token_id={a.image_token_id}",
        f"tokenizer.model_name_or_path={ckpt}", f"datasets={json.dumps(datasets)}", *PACKED, "batch_size=1",
        "gradient_accumulation_steps=1", "epochs=50", f"stop_after_steps={steps}", "save_every_n_steps=100000",
        "resume_from_checkpoint=false", "lr_scheduler.num_warmup_steps=2", f"metric_logger={json.dumps(logger)}",
        "train.backend=local", "train.nnodes=1", "train.nproc_per_node=1", "validate.thumbnails=0",
        *(toy if TOY else gpu),
    ])  # fmt: skip
    out = work / "gpu_check.yaml"
    out.write_text(json.dumps(cfg.to_dict(), indent=2))  # JSON is YAML
    return out


def model_flops(model: DocEVModel, a: DocEVArch, tokens: int, attention_pairs: int, tiles: int) -> float:
    """Model FLOPs of a training step (see the module docstring): one definition for packed and unpacked rows."""
    params = dict(model.named_parameters())
    unused = set(model.param_groups()["unused"])
    decoder = sum(p.numel() for n, p in params.items() if n.startswith(("decoder.layers.", "decoder.output.")))
    vision = sum(p.numel() for n, p in params.items() if n.startswith("encoder.layers.") and n not in unused)
    connector = sum(p.numel() for n, p in params.items() if n.startswith("connector.mlp."))
    patches = (a.tile_size // a.patch_size) ** 2
    flops = 6 * decoder * tokens + 12 * a.layers * a.dim * attention_pairs
    flops += tiles * (2 * vision * patches + 4 * (a.vision_layers - 1) * patches**2 * a.vision_width)
    return flops + tiles * 6 * connector * patches


def step_flops(row: dict, model: DocEVModel) -> float:
    """Model FLOPs of one logged step of the check's model."""
    return model_flops(model, arch(), row["num_tokens"], row["attention_pairs"], row["num_tiles"])


def report(work: Path, train_log: Path) -> None:
    """Stage 2's numbers from the run's metrics and log; the checkpoint is deleted after its save was timed. A
    recompile-limit warning fails the stage (past it dynamo silently runs eager)."""
    from docev.training.metrics_log import read_metrics

    rows = read_metrics(work / "run" / "logs" / "metrics.jsonl")
    log = train_log.read_text(errors="replace")
    tail = rows[len(rows) // 2 :] or rows  # compile warm-up excluded
    with torch.device("meta"):
        model = docev_reduced()
    seconds = sum(r["step_seconds"] for r in tail)
    median = statistics.median(r["step_seconds"] for r in tail)
    limit_hit = re.findall(r".*(?:recompile_limit|cache_size_limit).*", log)
    saved = re.search(r"Saved \S+ \((\w+)\) in ([\d.]+) s", log)
    blocked = re.search(r"training was blocked ([\d.]+) s", log)
    shutil.rmtree(work / "run" / "checkpoints", ignore_errors=True)
    result = {
        "ok": bool(rows) and not limit_hit,
        "steps": len(rows),
        "timed_steps": len(tail),
        "final_loss": rows[-1]["loss"] if rows else None,
        "tokens_per_second": sum(r["num_tokens"] for r in tail) / seconds,
        "median_step_seconds": median,
        "compile_seconds": rows[0]["step_seconds"] - median if rows else None,  # first step minus a warm one
        "model_tflops_per_second": sum(step_flops(r, model) for r in tail) / seconds / 1e12,
        "flops_per_token": sum(step_flops(r, model) for r in tail) / sum(r["num_tokens"] for r in tail),
        "peak_memory_alloc_gib": max((r.get("peak_memory_alloc", 0.0) for r in rows), default=0.0),
        "peak_memory_reserved_gib": max((r.get("peak_memory_reserved", 0.0) for r in rows), default=0.0),
        "compiled_graphs": rows[-1].get("compiled_graphs", 0) if rows else 0,
        "recompiles_logged": log.count("Recompiling function"),
        "recompile_limit_warnings": limit_hit[:3],
        "checkpoint_save_seconds": float(saved.group(2)) if saved else None,
        "checkpoint_blocked_seconds": float(blocked.group(1)) if blocked else None,
    }
    record(work, "train", result)
    if not result["ok"]:
        raise SystemExit("train stage failed: " + ("recompile limit hit" if limit_hit else "no step logged"))


def summary(work: Path) -> None:
    """The verdict: every stage present and ok."""
    path = out_dir(work) / "gpu_check.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    failed = [s for s in STAGES if not data.get(s, {}).get("ok")]
    print(f"[gpu_check] summary in {path}: " + ("all stages ok" if not failed else f"failed or missing: {failed}"))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    command, work_dir = sys.argv[1], Path(sys.argv[2])
    if command == "preflight":
        preflight(work_dir)
    elif command == "prepare":
        print(prepare(work_dir, int(sys.argv[3])))
    elif command == "report":
        report(work_dir, Path(sys.argv[3]))
    elif command == "summary":
        summary(work_dir)
    else:
        raise SystemExit(f"unknown command {command!r}: preflight | prepare | report | summary")
