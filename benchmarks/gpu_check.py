"""The Python half of ``benchmarks/gpu_check.sh``: the reduced-depth full-width model, its checkpoint, data and
config per run (``prepare``), and the tokens/s, MFU, peak-memory and recompile report from ``metrics.jsonl``
(``report``).

Model: SigLIP so400m widths with 3 layers (2 run: features come from the second-to-last layer), LDPv2 at
1152 → 4096 → 4096, and 4 Solar-mini decoder layers (4096 wide, 32 heads, 8 KV heads, MLP 14336) with the
real vocabulary: 64000 + 64 fusion rows, so the embedding and the chunked output projection are 64064 × 4096.
The tokenizer is the tiny one (a 64k BPE cannot be trained offline): ids use its first 1088 rows, which
changes no shape or FLOP.

Runs: ``packed`` (rows of 8192 tokens, flex attention from document ids) and ``unpacked`` (batch 1, length
buckets, S padded to multiples of 512, SDPA with ``is_causal``).

MFU counts the FLOPs of the model that runs, per step: decoder ``6·N·tokens``; attention ``12·L·d`` per query-key
pair the model attends (``attention_pairs`` of the metrics: n(n+1)/2 per document of n real tokens, one definition
for packed and unpacked rows — not what a kernel computes besides, flex's partly masked 128 × 128 blocks or SDPA's
padded tail, which would flatter one run against the other); the frozen vision tower forward only (``2·N·p`` +
``4·L·p²·d`` per tile, p = 1600 patches); the trainable connector MLP ``6·N·p`` per tile. Activation-checkpointing
recompute is not counted (the usual MFU convention). Peak: H200 dense bf16, 989 TFLOP/s. The seconds are the
recipe's ``step_seconds``: the whole step, from fetching its first micro-batch through the all-reduce, clipping,
``optimizer.step``, ``zero_grad`` and the lr-scheduler step (CUDA synchronised), the window torchtune's stock loop
times too. The MFU it prints is what ``benchmarks/loader_throughput.py --mfu`` takes.

    python benchmarks/gpu_check.py prepare WORKDIR STEPS packed|unpacked
    python benchmarks/gpu_check.py report WORKDIR packed|unpacked RECOMPILES
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from docev.models.docev import DocEVModel, docev_from_arch, preview

ROOT = Path(__file__).resolve().parents[1]
ARCH = replace(preview(), vision_layers=3, layers=4)
RUNS = {
    "packed": ["dataloader.packed=true", "dataloader.bucket_by_length=false", "dataloader.pad_to_multiple_of=null",
               "model.attention=flex"],
    "unpacked": ["dataloader.packed=false", "dataloader.bucket_by_length=true", "dataloader.pad_to_multiple_of=512",
                 "model.attention=sdpa"],
}  # fmt: skip
H200_BF16_FLOPS = 989e12


# ``model._component_`` of the check: the builder of docev_preview/docev_tiny at the reduced widths.
docev_reduced = partial(docev_from_arch, ARCH)


def prepare(work: Path, steps: int, run: str) -> Path:
    """Checkpoint (tiny tokenizer + reduced-depth full-width bf16 weights), 96 synthetic pages, the run's config."""
    from docev.assets import init_checkpoint, init_weights
    from docev.config import load_config
    from docev.models.docev import hf_config
    from docev.models.docev._folder import save_sharded
    from docev.synth import synth_data

    ckpt = work / "ckpt"
    config_path = ckpt / "config.json"
    if not config_path.exists() or json.loads(config_path.read_text())["text_config"]["hidden_size"] != ARCH.dim:
        shutil.rmtree(ckpt, ignore_errors=True)
        init_checkpoint(ckpt, size="tiny", seed=0)  # tokenizer, chat template, generation config
        for f in [*ckpt.glob("model-*.safetensors"), ckpt / "model.safetensors.index.json"]:
            f.unlink()
        save_sharded({k: v.to(torch.bfloat16) for k, v in init_weights(ARCH).items()}, ckpt, 2 * 10**9)
        config = hf_config(ARCH)
        config["torch_dtype"] = "bfloat16"
        config_path.write_text(json.dumps(config, indent=2))
        pre = json.loads((ckpt / "preprocessor_config.json").read_text())
        pre["size"] = pre["crop_size"] = {"height": ARCH.tile_size, "width": ARCH.tile_size}
        pre["image_grid_pinpoints"] = config["image_grid_pinpoints"]
        (ckpt / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    if not (work / "synth" / "instruct").exists():
        synth_data(work / "synth", 96, seed=0, fmt="jsonl", workers=8)

    datasets = [{"source": str(work / "synth" / "instruct"), "name": "instruct"},
                {"source": str(work / "synth" / "pretrain"), "name": "pretrain", "ufx_type": "pretrain",
                 "context_col": "text"}]  # fmt: skip
    out_dir = work / f"run-{run}"
    logger = {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out_dir / "logs")}
    cfg = load_config(ROOT / "configs" / "docev_preview.yaml", [
        f"output_dir={out_dir}", "model._component_=gpu_check.docev_reduced", "model.image_token_id=1024",
        f"tokenizer.model_name_or_path={ckpt}", f"datasets={json.dumps(datasets)}",
        "dataloader.num_workers=4", *RUNS[run], "batch_size=1", "gradient_accumulation_steps=1",
        "epochs=20", f"stop_after_steps={steps}", "save_every_n_steps=100000", "resume_from_checkpoint=false",
        "lr_scheduler.num_warmup_steps=2", f"metric_logger={json.dumps(logger)}", "train.backend=local",
        "train.nnodes=1", "train.nproc_per_node=1", "validate.workers=8", "validate.thumbnails=0",
        "preprocess.workers=8",
    ])  # fmt: skip
    out = work / f"gpu_check-{run}.yaml"
    out.write_text(json.dumps(cfg.to_dict(), indent=2))  # JSON is YAML
    return out


def step_flops(row: dict, model: DocEVModel) -> float:
    """Model FLOPs of one logged step (see the module docstring)."""
    params = dict(model.named_parameters())
    unused = set(model.param_groups()["unused"])
    decoder = sum(p.numel() for n, p in params.items() if n.startswith(("decoder.layers.", "decoder.output.")))
    vision = sum(p.numel() for n, p in params.items() if n.startswith("encoder.layers.") and n not in unused)
    connector = sum(p.numel() for n, p in params.items() if n.startswith("connector.mlp."))
    patches = (ARCH.tile_size // ARCH.patch_size) ** 2
    tokens, tiles = row["num_tokens"], row["num_tiles"]
    flops = 6 * decoder * tokens + 12 * ARCH.layers * ARCH.dim * row["attention_pairs"]
    flops += tiles * (2 * vision * patches + 4 * (ARCH.vision_layers - 1) * patches**2 * ARCH.vision_width)
    return flops + tiles * 6 * connector * patches


def report(work: Path, run: str, recompiles: int) -> None:
    from docev.training.metrics_log import read_metrics

    rows = read_metrics(work / f"run-{run}" / "logs" / "metrics.jsonl")
    tail = rows[len(rows) // 2 :]  # compile warm-up excluded
    with torch.device("meta"):
        model = docev_reduced()
    seconds = sum(r["step_seconds"] for r in tail)
    flops = sum(step_flops(r, model) for r in tail)
    alloc = max(r.get("peak_memory_alloc", 0.0) for r in rows)
    reserved = max(r.get("peak_memory_reserved", 0.0) for r in rows)
    print(f"[{run}] steps {len(rows)} (last {len(tail)} timed); final loss {rows[-1]['loss']:.3f}")
    print(f"tokens/s        {sum(r['num_tokens'] for r in tail) / seconds:10.0f}")
    print(f"tiles/s         {sum(r['num_tiles'] for r in tail) / seconds:10.1f}")
    print(f"median step     {statistics.median(r['step_seconds'] for r in tail):10.3f} s")
    print(f"padding share   {statistics.mean(r['padding_share'] for r in tail):10.1%}")
    print(f"MFU             {flops / seconds / H200_BF16_FLOPS:10.1%}  ({flops / seconds / 1e12:.0f} TFLOP/s of 989)")
    print(f"peak memory     {alloc:10.1f} GiB allocated, {reserved:.1f} GiB reserved")
    print(f"compiled graphs {rows[-1].get('compiled_graphs', 0):10d}  (TORCH_LOGS=recompiles: {recompiles} recompiles)")


if __name__ == "__main__":
    command, work = sys.argv[1], Path(sys.argv[2])
    if command == "prepare":
        print(prepare(work, int(sys.argv[3]), sys.argv[4]))
    elif command == "report":
        report(work, sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {command!r}: prepare WORKDIR STEPS RUN | report WORKDIR RUN RECOMPILES")
