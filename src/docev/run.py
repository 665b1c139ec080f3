"""Run the pipeline locally, end to end, on one config.

With a ``synthetic`` section the embedded default is made first (tiny checkpoint + synthetic
UFX documents, only when missing), so ``make demo`` needs nothing but this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

from docev.config import DocEVConfig


def ensure_assets(cfg: DocEVConfig) -> None:
    """Create the tiny checkpoint and synthetic sources named by the config when they are missing."""
    syn = cfg.synthetic
    if syn is None:
        return
    from docev.assets import init_checkpoint
    from docev.synth import synth_data

    ckpt = Path(cfg.checkpointer.checkpoint_dir)
    if not (ckpt / "model.safetensors.index.json").exists():
        print(f"[assets] writing tiny DocEV checkpoint to {ckpt}")
        init_checkpoint(ckpt, size=syn.checkpoint_size, seed=syn.seed)
    data = Path(syn.data_dir)
    if not all((data / kind).exists() for kind in ("instruct", "pretrain")):
        print(f"[assets] rendering {syn.records} synthetic documents to {data}")
        synth_data(data, syn.records, seed=syn.seed, fmt=syn.format)


def run_local(cfg: DocEVConfig) -> dict[str, Path]:
    """Every step available so far, in pipeline order. Returns the outputs by name."""
    ensure_assets(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = out / "config.resolved.json"
    resolved.write_text(json.dumps(cfg.to_dict(), indent=2))
    from docev.validate.runner import run_validate, validate_dir

    print("[validate] checking UFX sources")
    report = run_validate(cfg)
    for name, s in report["sources"].items():
        print(f"  {name}: read {s['read']}, accepted {s['accepted']}, rejected {s['rejected']}")
    from docev.data.preprocess import run_preprocess, shards_dir

    print("[preprocess] writing tiled shards")
    manifest = run_preprocess(cfg)
    print(f"  {manifest['total_samples']} samples in {len(manifest['shards'])} shards")
    outputs = {
        "config": resolved,
        "base_checkpoint": Path(cfg.checkpointer.checkpoint_dir),
        "validate_report": validate_dir(cfg) / "report.md",
        "validate_manifest": validate_dir(cfg) / "manifest.jsonl",
        "rejects": validate_dir(cfg) / "rejects.jsonl",
        "shards": shards_dir(cfg) / "manifest.json",
    }
    print("[run] outputs:")
    for name, path in outputs.items():
        print(f"  {name:28s} {path}")
    return outputs
