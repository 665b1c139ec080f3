"""Adapters applied to a base for inference: a PEFT LoRA/DoRA folder (``docev generate --adapter``) and an
adapter run's step folder (``trained_model.safetensors`` + ``peft.json``: ``docev evaluate --checkpoint
latest``, ``docev generate --model checkpoints/step_N``), both merged in memory.

Here, below the export and evaluation, so that loading a base + adapter model never imports the export
package; the export reuses the merge and the folder layout when it writes ``adapter/``. Merging is
torchtune's ``get_merged_lora_ckpt`` on float32 copies of the adapted modules (``W + (alpha/rank)·B·A``;
DoRA: that, rescaled row-wise to the learned magnitude). Both kinds record the fingerprint of the base
they were trained on (``peft.json``, ``base.json``); a base with another fingerprint is refused, since
adapters on the wrong base run and answer garbage.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torchtune.modules.peft import get_merged_lora_ckpt

from docev.models.docev import DocEVArch, DocEVCheckpointer, docev_hf_to_tune
from docev.models.docev._peft import base_fingerprint, read_trained

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BASE = "base.json"  # {"base_dir", "base": fingerprint} of the base an exported adapter was trained on
PEFT_PREFIX = "base_model.model."


class BaseMismatchError(ValueError):
    """Adapters offered to a base other than the one they were trained on."""


def check_base(recorded: Mapping[str, str], base_dir: str | Path, what: str) -> None:
    """Raise :class:`BaseMismatchError` naming both fingerprints when ``base_dir`` is not the recorded base."""
    actual = base_fingerprint(base_dir)
    if dict(recorded) != actual:
        raise BaseMismatchError(
            f"{what} was trained on another base than {base_dir}: recorded fingerprint {_fmt(recorded)}; "
            f"{base_dir} has {_fmt(actual)} (apply it to the base it was trained on)"
        )


def _fmt(fingerprint: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(fingerprint.items())) + "}"


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


def merge_trained(
    state: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], rank: int, alpha: float
) -> dict[str, torch.Tensor]:
    """A base's torchtune state with an adapter run's trained tensors: fully trained groups replace the
    base's tensors, adapters (keys the base lacks) are merged into the weights they adapt."""
    adapters = {k: v for k, v in trained.items() if k not in state}
    out = dict(state)
    out.update({k: v for k, v in trained.items() if k in state})
    return merge_adapters(out, adapters, rank, alpha)


def adapter_run_state(
    folder: str | Path, base_dir: str | Path | None = None
) -> tuple[dict[str, torch.Tensor], DocEVArch]:
    """(torchtune state of the merged model, arch) of an adapter run's step folder: its base (``base_dir``,
    default the one ``peft.json`` names) with the trained tensors laid over and the adapters merged.

    Raises:
        BaseMismatchError: ``base_dir`` is not the base the folder was trained on.
    """
    folder = Path(folder)
    trained, meta = read_trained(folder, None)
    base_dir = Path(base_dir if base_dir is not None else meta["base_dir"])
    check_base(meta["base"], base_dir, str(folder))
    base = DocEVCheckpointer(base_dir)
    state, _ = docev_hf_to_tune(base.load_hf_state_dict(), base.arch)
    spec = meta["spec"]
    try:
        merged = merge_trained(state, trained, int(spec["rank"]), float(spec["alpha"]))
    except ValueError as exc:
        raise ValueError(f"{folder}: {exc}") from None
    return merged, base.arch


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


def apply_adapter(
    hf: Mapping[str, torch.Tensor], adapter_dir: Path, base_dir: str | Path | None = None
) -> dict[str, torch.Tensor]:
    """A base's HF tensors with a PEFT adapter merged in (float32 merge, cast back to each base tensor's
    dtype) and its ``modules_to_save`` tensors in place: the base + adapter model ``docev generate`` runs.
    With ``base_dir`` (the folder ``hf`` came from), an adapter that records its base (``base.json``, our
    exports) is refused on another one (:class:`BaseMismatchError`)."""
    recorded = Path(adapter_dir) / ADAPTER_BASE
    if base_dir is not None and recorded.is_file():
        check_base(json.loads(recorded.read_text())["base"], base_dir, str(adapter_dir))
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
