"""Exports of an adapter run: the merged model (released HF layout) and the adapter in PEFT's format.

A LoRA step folder holds the trained tensors only (``training/peft.py``); the base comes from
``checkpointer.checkpoint_dir``, which must be the one the adapters were trained on (``peft.json``
records it). Merging is torchtune's ``get_merged_lora_ckpt`` on float32 copies of the adapted
modules (``W + (alpha/rank)·B·A``; DoRA: that, rescaled row-wise to the learned magnitude), then the
cast to ``export.dtype``. The PEFT adapter (``adapter/``) carries the adapters under the released
model's HF names (``base_model.model.language_model.model.layers.N.self_attn.q_proj.lora_A.weight``),
with the RoPE row permutation of ``q_proj``/``k_proj`` applied to ``lora_B`` (and to DoRA's magnitude,
which is per output row), and the fully trained groups as ``modules_to_save``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torchtune.models.convert_weights import tune_to_peft_adapter_weights

from docev.config import ModelSection
from docev.export.weights import ExportError, frozen_state_keys, ordered_hf
from docev.inference.adapter import (
    ADAPTER_BASE,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    BaseMismatchError,
    check_base,
    merge_trained,
)
from docev.models.docev import DocEVArch, DocEVCheckpointer, docev_hf_to_tune, docev_tune_to_hf
from docev.models.docev._convert_weights import fusion_key_map
from docev.models.docev._peft import PeftCheckpointError, PeftSpec, base_fingerprint, read_trained

ADAPTER_DIR = "adapter"
_LM = "language_model."
# torchtune module name → the HF module under language_model.
_HF_MODULE = {"q_proj": r"self_attn\.q_proj", "k_proj": r"self_attn\.k_proj", "v_proj": r"self_attn\.v_proj",
              "output_proj": r"self_attn\.o_proj", "w1": r"mlp\.gate_proj", "w2": r"mlp\.down_proj",
              "w3": r"mlp\.up_proj"}  # fmt: skip


def adapter_spec(model: ModelSection) -> PeftSpec:
    spec = PeftSpec.from_model(model)
    if spec is None:
        raise ExportError(f"the checkpoint is an adapter run's, but model._component_ {model.component} is no lora_* "
                          "builder: export it with the run's config")  # fmt: skip
    return spec


def merged_and_adapter(
    checkpoint_dir: Path, base_dir: Path, model: ModelSection, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], DocEVArch, dict[str, torch.Tensor], dict[str, Any]]:
    """(merged HF tensors in ``dtype``, arch, PEFT adapter tensors in ``dtype``, ``adapter_config.json``).

    Raises:
        ExportError: other adapter settings than the config's, or another base than the one trained on.
    """
    spec = adapter_spec(model)
    try:
        trained, meta = read_trained(checkpoint_dir, spec)
    except PeftCheckpointError as exc:
        raise ExportError(str(exc)) from None
    try:
        check_base(meta["base"], base_dir, f"{checkpoint_dir} (trained on {meta['base_dir']})")
    except BaseMismatchError as exc:
        raise ExportError(str(exc)) from None
    base = DocEVCheckpointer(base_dir)
    arch = base.arch
    state, unused = docev_hf_to_tune(base.load_hf_state_dict(), arch)
    frozen = set(frozen_state_keys(arch, model))
    overlap = sorted(set(trained) & frozen)
    if overlap:
        raise ExportError(f"{checkpoint_dir}: trains {overlap[:3]}, which this config freezes")
    adapters = {k: v for k, v in trained.items() if k not in state}
    try:
        merged = merge_trained(state, trained, spec.rank, spec.alpha)
    except ValueError as exc:
        raise ExportError(f"{checkpoint_dir}: {exc}") from None
    hf = ordered_hf(docev_tune_to_hf(merged, arch), unused, arch, dtype)
    peft_tensors = peft_adapter_tensors(adapters, arch)
    peft_tensors.update(saved_modules(hf, trained, arch))
    peft_tensors = {k: v.to(dtype).contiguous() for k, v in peft_tensors.items()}
    return hf, arch, peft_tensors, adapter_config(spec, base_dir, model)


def peft_adapter_tensors(adapters: Mapping[str, torch.Tensor], arch: DocEVArch) -> dict[str, torch.Tensor]:
    """torchtune adapter keys (``decoder.layers.N.attn.q_proj.lora_a.weight``) → PEFT keys in the released
    model's naming, through torchtune's own converter (which permutes ``lora_B`` of q/k for RoPE)."""
    decoder = {k.removeprefix("decoder."): v for k, v in adapters.items()}
    converted = tune_to_peft_adapter_weights(
        decoder, num_heads=arch.heads, num_kv_heads=arch.kv_heads, dim=arch.dim, head_dim=arch.head_dim
    )
    out = {}
    for key, value in converted.items():
        inner = key.removeprefix(PEFT_PREFIX)
        if inner.endswith("lora_magnitude_vector") and re.search(r"\.(q_proj|k_proj)\.", inner):
            heads = arch.heads if ".q_proj." in inner else arch.kv_heads
            # torchtune's converter leaves the magnitude in torchtune's row order; HF rows are permuted
            value = value.view(heads, arch.head_dim // 2, 2).transpose(1, 2).reshape(-1)
        out[PEFT_PREFIX + _LM + inner] = value
    return out


def saved_modules(hf: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], arch: DocEVArch) -> dict:
    """The HF tensors of the fully trained (non-adapter) groups, as PEFT's ``modules_to_save`` stores them
    (``base_model.model.<module>.<param>``); the embedding goes whole since its fusion rows train."""
    to_hf = {tune: key for key, tune in fusion_key_map(arch).items()}
    to_hf["tok_embeddings.fusion_embedding.weight"] = f"{_LM}model.embed_tokens.weight"
    out = {}
    for key in trained:
        if ".lora_" in key or key.endswith(".magnitude"):
            continue
        if key not in to_hf:
            raise ExportError(f"{key} trained outside the adapters, the fusion and the encoder groups")
        out[PEFT_PREFIX + to_hf[key]] = hf[to_hf[key]]
    return dict(sorted(out.items()))


def _module_of(hf_key: str) -> str:
    return hf_key.rsplit(".", 1)[0]


def target_regex(spec: PeftSpec) -> str:
    """PEFT ``target_modules`` as a full-match regex: the decoder's projections only (a bare ``q_proj``
    would also match the SigLIP tower's)."""
    layer = [_HF_MODULE[t] for t in spec.targets if t in _HF_MODULE]
    parts = [rf"language_model\.model\.layers\.\d+\.({'|'.join(layer)})"] if layer else []
    if "output" in spec.targets:
        parts.append(r"language_model\.lm_head")
    return "|".join(parts) if len(parts) == 1 else "|".join(f"({p})" for p in parts)


def adapter_config(spec: PeftSpec, base_dir: Path, model: ModelSection) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` (a ``LoraConfig``) for these adapters."""
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_dir),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_regex(spec),
        "use_dora": spec.use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def finish_adapter_config(config: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``modules_to_save`` from the whole-module tensors the adapter file holds."""
    saved = sorted({_module_of(k.removeprefix(PEFT_PREFIX)) for k in tensors if ".lora_" not in k})
    return {**config, "modules_to_save": saved or None}


def write_adapter(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """``folder/adapter/``: the PEFT files, read back and compared bit for bit, and ``base.json``: the base's
    fingerprint, so that ``docev generate --adapter`` refuses another base (PEFT's config names a path only)."""
    out = folder / ADAPTER_DIR
    out.mkdir()
    config = finish_adapter_config(dict(config), tensors)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    base_dir = config["base_model_name_or_path"]
    (out / ADAPTER_BASE).write_text(json.dumps({"base_dir": base_dir, "base": base_fingerprint(base_dir)}, indent=2))
    save_file(dict(tensors), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    back = load_file(str(out / ADAPTER_WEIGHTS))
    bad = [k for k in tensors if k not in back or not torch.equal(back[k], tensors[k])]
    if bad or set(back) != set(tensors):
        raise ExportError(f"{out / ADAPTER_WEIGHTS}: read back wrong ({bad[:3]})")
    for path in (out, *out.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
