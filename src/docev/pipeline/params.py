"""Run parameters of the compiled pipeline: the whole config plus the knobs a person edits on rerun.

The config is embedded as one JSON string parameter; the knobs are separate parameters so "Clone
run" in the KFP UI shows them as fields. They are applied as overrides on top of the embedded config
(the same schema, the same errors) by the first task, which hands every later task the resolved
config, so an edited knob means the same thing to every step.
"""

from __future__ import annotations

import json
from typing import Any

from docev.config import DocEVConfig, resolve, validate_dict

# knob → (dotted config path, type shown in the UI)
KNOBS: dict[str, tuple[str, type]] = {
    "learning_rate": ("optimizer.lr", float),
    "epochs": ("epochs", int),
    "max_steps_per_epoch": ("max_steps_per_epoch", int),  # 0 = the whole epoch
    "num_nodes": ("train.nnodes", int),
    "gpus_per_node": ("train.nproc_per_node", int),
    "resume": ("resume_from_checkpoint", str),  # auto | true | false
    "eval_every_n_steps": ("eval_every_n_steps", int),  # 0 = only after the last step
    "lora_rank": ("model.lora_rank", int),  # 0 = the config's (a full fine-tune has none)
}
# Every run parameter, in signature order: the embedded config, then the knobs. The pipeline's signature is
# built from it and the components' are generated from it (components/generate.py).
RUN_PARAMETERS: dict[str, type] = {"config_json": str, **{name: kind for name, (_, kind) in KNOBS.items()}}


def knob_defaults(cfg: DocEVConfig) -> dict[str, Any]:
    """The knobs' values in a config (their defaults in the compiled pipeline)."""
    lr = (cfg.optimizer.model_extra or {}).get("lr")
    if not isinstance(lr, int | float):
        raise ValueError("optimizer.lr must be set to a number: it is the learning_rate run parameter")
    return {
        "learning_rate": float(lr),
        "epochs": cfg.epochs,
        "max_steps_per_epoch": cfg.max_steps_per_epoch or 0,
        "num_nodes": cfg.train.nnodes,
        "gpus_per_node": cfg.train.nproc_per_node,
        "resume": str(cfg.resume_from_checkpoint).lower(),
        "eval_every_n_steps": cfg.eval_every_n_steps or 0,
        "lora_rank": cfg.model.lora_rank or 0,
    }


def knob_overrides(knobs: dict[str, Any], cfg: DocEVConfig) -> list[str]:
    """``key=value`` overrides for the given knob values (GPU resources follow gpus_per_node on CUDA)."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown run parameter(s) {unknown}; expected {sorted(KNOBS)}")
    out = []
    for name, value in knobs.items():
        path, kind = KNOBS[name]
        value = kind(float(value)) if kind is not str else str(value)  # KFP may hand ints over as floats
        if name in ("max_steps_per_epoch", "eval_every_n_steps"):
            value = value or None
        elif name == "lora_rank" and not value:
            continue
        elif name == "resume":
            value = {"true": True, "false": False, "auto": "auto"}.get(value.lower(), value)
        out.append(f"{path}={json.dumps(value)}")
    if "gpus_per_node" in knobs and cfg.device == "cuda":
        out.append(f"train.resources.gpu={int(knobs['gpus_per_node'])}")
    return out


def resolve_run_config(config_json: str, **knobs: Any) -> DocEVConfig:
    """The embedded config with the run's knobs applied, validated (errors name the run parameter's path)."""
    base = validate_dict(json.loads(config_json), origin="config_json")
    data = resolve(json.loads(config_json), knob_overrides(knobs, base), origin="run parameters")
    return validate_dict(data, origin="run parameters")
