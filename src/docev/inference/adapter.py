"""PEFT LoRA/DoRA adapters applied to a base's HF tensors, for inference (``docev generate --adapter``).

Here, below the export, so that loading a base + adapter model never imports the export package;
the export reuses the merge and the folder layout when it writes ``adapter/``. Merging is torchtune's
``get_merged_lora_ckpt`` on float32 copies of the adapted modules (``W + (alpha/rank)·B·A``; DoRA:
that, rescaled row-wise to the learned magnitude).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torchtune.modules.peft import get_merged_lora_ckpt

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def merge_adapters(
    state: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """``state`` with every adapted module's weight merged in float32 by torchtune's ``get_merged_lora_ckpt``
    (any naming: ``<module>.lora_a.weight``, ``<module>.lora_b.weight``, ``<module>.magnitude``).

    Raises:
        ValueError: an adapter on a module ``state`` has no weight for.
    """
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in adapters}
    missing = sorted(m for m in modules if f"{m}.weight" not in state)
    if missing:
        raise ValueError(f"adapters on {missing[:3]}, which the base has no weight for")
    part = {k: v.float() for k, v in adapters.items()}
    part.update({f"{m}.weight": state[f"{m}.weight"].float() for m in modules})
    merged = get_merged_lora_ckpt(part, rank=rank, alpha=alpha)
    out = dict(state)
    out.update(merged)
    return out


def read_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` and the tensors of a PEFT LoRA adapter folder (the export's layout)."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{adapter_dir}: no {path.name} (not a PEFT adapter folder)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_rslora"):
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r}: only LoRA/DoRA adapters apply")
    return config, load_file(str(weights_path))


def apply_adapter(hf: Mapping[str, torch.Tensor], adapter_dir: Path) -> dict[str, torch.Tensor]:
    """A base's HF tensors with a PEFT adapter merged in (float32 merge, cast back to each base tensor's
    dtype) and its ``modules_to_save`` tensors in place: the base + adapter model ``docev generate`` runs."""
    config, tensors = read_adapter(adapter_dir)
    renamed, whole = {}, {}
    for key, value in tensors.items():
        inner = key.removeprefix(PEFT_PREFIX)
        if ".lora_" in inner:
            inner = inner.replace(".lora_A.", ".lora_a.").replace(".lora_B.", ".lora_b.")
            renamed[inner.replace(".lora_magnitude_vector", ".magnitude")] = value
        else:
            whole[inner] = value
    unknown = sorted(k for k in whole if k not in hf)
    if unknown:
        raise ValueError(f"{adapter_dir}: {unknown[:3]} are not tensors of the base model")
    try:
        merged = merge_adapters(hf, renamed, int(config["r"]), float(config["lora_alpha"]))
    except ValueError as exc:
        raise ValueError(f"{adapter_dir}: {exc}") from None
    out = {k: merged[k].to(hf[k].dtype) for k in hf}
    out.update({k: v.to(hf[k].dtype) for k, v in whole.items()})
    return out
