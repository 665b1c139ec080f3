"""Memory of the trained state per GPU at preview size, counted from a meta-device build (nothing allocated).

Builds ``configs/docev_preview.yaml``'s model on the meta device with its trainable flags, counts the
parameters (all, trainable, per FSDP unit as ``docev.training.parallelize`` shards them) and prints, for
each GPU count and ``master_dtype``, what FSDP2 keeps sharded on every GPU: parameters (frozen ones too,
in the master dtype), gradients and AdamW's two moments (trainable parameters only, in the master dtype);
the frozen vision tower, replicated whole on every GPU in the compute dtype; and the transient unsharded
compute-dtype copies of the largest units (the root unit: final norm, connector, ``image_newline``; and two
of the largest other units: the one running and the one prefetched).
Activations are not counted (they depend on the batch, not on the precision of the state).

    .venv/bin/python benchmarks/train_memory.py [--gpus 8 16] [--config configs/docev_preview.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

from docev.config import load_config
from docev.training.parallelize import build_model, frozen_tower, shard_condition

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "docev_preview.yaml"
BYTES = {"fp32": 4, "bf16": 2}
GB = 1e9


def count(config: Path) -> dict[str, int]:
    cfg = load_config(config, ["output_dir=/tmp/unused"])
    model = build_model(OmegaConf.create(cfg.to_dict()["model"]), torch.float32)
    units = [m for n, m in model.named_modules() if shard_condition(n, m)]
    in_units = {id(p) for m in units for p in m.parameters()}
    tower = {id(p) for p in frozen_tower(model)}
    layer = max(sum(p.numel() for p in m.parameters()) for m in units)
    return {
        "total": sum(p.numel() for p in model.parameters() if id(p) not in tower),  # sharded
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tower": sum(p.numel() for p in model.parameters() if id(p) in tower),
        "root_unit": sum(p.numel() for p in model.parameters() if id(p) not in in_units | tower),
        "largest_unit": layer,
        "compute_bytes": BYTES[cfg.dtype],
    }


def table(n: dict[str, int], gpus: list[int]) -> list[str]:
    rows = [
        "| GPUs | master_dtype | parameters | gradients | AdamW moments | sharded state | + frozen tower | "
        "+ unsharded units | total |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tower = n["tower"] * n["compute_bytes"] / GB
    transient = (n["root_unit"] + 2 * n["largest_unit"]) * n["compute_bytes"] / GB
    for g in gpus:
        for master in ("fp32", "bf16"):
            b = BYTES[master]
            params = n["total"] * b / g / GB
            grads = n["trainable"] * b / g / GB
            moments = 2 * n["trainable"] * b / g / GB
            state = params + grads + moments
            rows.append(
                f"| {g} | {master} | {params:.1f} GB | {grads:.1f} GB | {moments:.1f} GB | {state:.1f} GB | "
                f"{tower:.2f} GB | {transient:.1f} GB | {state + tower + transient:.1f} GB |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    n = count(args.config)
    print(
        f"sharded parameters {n['total'] / 1e9:.3f}B, trainable {n['trainable'] / 1e9:.3f}B, replicated frozen "
        f"tower {n['tower'] / 1e9:.3f}B, root unit {n['root_unit'] / 1e9:.3f}B, largest other unit "
        f"{n['largest_unit'] / 1e6:.1f}M "
        f"(compute dtype: {n['compute_bytes']} bytes)"
    )
    print("\n".join(table(n, args.gpus)))


if __name__ == "__main__":
    main()
