"""The embedded default: with a ``synthetic`` section, ``docev run`` first makes the tiny checkpoint and
synthetic UFX documents (only when missing), so ``make demo`` needs nothing but this repository."""

from __future__ import annotations

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
