"""What each KFP task does, as plain functions (the components in ``components/`` are thin wrappers).

Every step takes the resolved config as a JSON string (the output of :func:`resolve_step`) and works on
the shared volume under ``output_dir``; what it returns is small (counts, paths) and travels through
KFP as metrics, reports and parameters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from docev.config import DocEVConfig, validate_dict
from docev.pipeline.params import resolve_run_config


def load(config_json: str) -> DocEVConfig:
    return validate_dict(json.loads(config_json), origin="config_json")


def config_path(cfg: DocEVConfig) -> Path:
    """Where the run's resolved config lives on the volume (the PyTorchJob reads it from there)."""
    return Path(cfg.output_dir) / "pipeline" / "config.json"


def resolve_step(config_json: str, **knobs: Any) -> str:
    """Apply the run parameters, validate, write the resolved config to the volume; return it as JSON."""
    cfg = resolve_run_config(config_json, **knobs)
    path = config_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(cfg.to_dict(), indent=2)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def validate_shard_step(config_json: str, shard: int, num_shards: int) -> None:
    from docev.validate.runner import run_shard

    run_shard(load(config_json), int(shard), int(num_shards))


def validate_merge_step(config_json: str, num_shards: int) -> dict[str, Any]:
    """Merge the shards; the reject policy raises after the reports are written."""
    from docev.validate.runner import merge

    return merge(load(config_json), int(num_shards))


def preprocess_shard_step(config_json: str, shard: int, num_shards: int) -> list[int]:
    from docev.data.preprocess import run_shards

    return run_shards(load(config_json), int(shard), int(num_shards))


def preprocess_merge_step(config_json: str) -> dict[str, Any]:
    from docev.data.preprocess import merge

    return merge(load(config_json))


def train_step(config_json: str, run_id: str, task: str) -> dict[str, Any]:
    """Train with the configured backend; return the last logged metrics and the step count.

    ``local``: ``docev train`` (torchrun with ``train.nproc_per_node`` processes) in this pod or process.
    ``kubernetes``: a PyTorchJob created (or adopted on retry) and followed to completion; its failure
    fails this step. Resuming from ``latest`` is the recipe's, so a retried step continues, not restarts.
    """
    from docev.training.metrics import read_metrics

    cfg = load(config_json)
    path = config_path(cfg)
    if cfg.train.backend == "kubernetes":
        from docev.k8s.launcher import launch_pytorchjob

        launch_pytorchjob(cfg, config_path=str(path), run_id=run_id, task=task)
    else:
        cmd = [sys.executable, "-m", "docev.cli", "train", "--config", str(path)]
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"training failed (exit {done.returncode}); see {Path(cfg.output_dir) / 'logs'}")
    logged = read_metrics(Path(cfg.output_dir) / "logs" / "metrics.jsonl")
    if not logged:
        raise RuntimeError(f"training wrote no metrics to {Path(cfg.output_dir) / 'logs' / 'metrics.jsonl'}")
    return {"steps": logged[-1]["step"], **{k: v for k, v in logged[-1].items() if isinstance(v, int | float)}}


def export_step(config_json: str) -> dict[str, Any]:
    from docev.export.export import export_checkpoint

    cfg = load(config_json)
    result = export_checkpoint(cfg)
    return {
        "destination": result.destination,
        "step": result.step,
        "dtype": result.dtype,
        "files": len(result.checksums),
        "smoke": result.smoke.text if result.smoke else None,
    }
