"""What a LoRA / DoRA / QLoRA run of ``DocEVFinetuneRecipe`` does differently from full fine-tuning.

The recipe class is the same; with a ``lora_*`` model builder it calls this module at four points:

- **start folder**: under ``resume_from_checkpoint: auto`` a checkpoint of other adapter settings (or
  another base) is not resumed, so a rerun with another ``lora_rank`` starts from the base;
- **load**: the weights always come from the base checkpoint; a resumed run lays the step folder's
  trained tensors (adapters + fully trained groups) over them, after checking that the folder was
  trained with the same adapter settings on the same base (else an error naming what differs);
- **model fill**: the base state dict has no adapter keys, so it loads non-strictly and the missing
  keys must be exactly the adapters; fresh adapters get torchtune's initialisation (A Kaiming, B zero),
  DoRA magnitudes are computed from the loaded base as torchtune's LoRA recipe does;
- **save**: only parameters with ``requires_grad`` are gathered (``trained_state_dict``, a filter on
  the model, usable by any save path) and written by ``DocEVCheckpointer.save_trained_checkpoint``;
  the optimizer state holds the same parameters, since the optimizer only ever sees trainable ones.

``peft.json`` in a step folder records the adapter settings and the base's fingerprint
(``base_fingerprint``), which resume and export check.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchtune import utils
from torchtune.modules.peft import DoRALinear, LoRALinear, get_adapter_params

from docev.config import DocEVConfig
from docev.models.docev import DocEVCheckpointer
from docev.models.docev._folder import PEFT_META
from docev.models.docev._peft import PeftCheckpointError, PeftSpec, base_fingerprint, is_trained_only, read_trained
from docev.run.checkpoints import RECIPE_STATE
from docev.training.load import Rows, fill_model

log = utils.get_logger("INFO")


class PeftRun:
    """The adapter-specific steps of the recipe for one run (see the module docstring)."""

    def __init__(self, cfg: DocEVConfig, spec: PeftSpec):
        self.cfg = cfg
        self.spec = spec
        self.base_dir = Path(cfg.checkpointer.checkpoint_dir)
        self._metadata: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: DocEVConfig) -> PeftRun | None:
        spec = PeftSpec.from_model(cfg.model)
        return None if spec is None else cls(cfg, spec)

    def start_folder(self, folder: Path, resumed: bool, resume: bool | str) -> tuple[Path, bool]:
        """``resume_from_checkpoint: auto`` resumes only a checkpoint of these adapter settings on this base
        (a rerun with another ``lora_rank`` starts from the base); ``true`` resumes or fails in ``load``."""
        if not resumed or resume != "auto":
            return folder, resumed
        why = None
        if not is_trained_only(folder):
            why = "it is a full fine-tuning checkpoint"
        else:
            meta = json.loads((Path(folder) / PEFT_META).read_text())
            if meta["spec"] != self.spec.as_dict():
                why = "it was trained with other adapter settings"
            elif meta["base"] != base_fingerprint(self.base_dir):
                why = "it was trained on another base"
        if why is None:
            return folder, True
        log.info(f"resume_from_checkpoint auto: not resuming {folder} ({why}); starting from {self.base_dir}")
        return self.base_dir, False

    def load(self, checkpointer: DocEVCheckpointer, resumed_from: Path | None) -> dict[str, Any]:
        """The base state dict (``checkpointer`` reads the base), with a step folder's trained tensors and
        recipe state laid over it when resuming."""
        state = checkpointer.open_checkpoint()  # "model": read by rows when the model is filled
        if resumed_from is None:
            return state
        trained, meta = read_trained(resumed_from, self.spec)
        if meta["base"] != base_fingerprint(self.base_dir):
            raise PeftCheckpointError(
                f"{resumed_from} was trained on another base than {self.base_dir} (config or weight files differ)"
            )
        state["model"].update(trained)
        state.update(torch.load(Path(resumed_from) / RECIPE_STATE, map_location="cpu", weights_only=True))
        return state

    @staticmethod
    def load_model(model: nn.Module, state_dict: Mapping[str, Rows], device: torch.device) -> None:
        """Fill the sharded model: base (+ trained) tensors; adapters the state dict lacks are initialised
        (first run only). Raises when keys other than adapters are missing, or any is unexpected."""
        adapters = set(get_adapter_params(model))
        missing, unexpected = map(set, fill_model(model, state_dict, device))  # each rank reads its rows only
        not_adapters = sorted(missing - adapters)
        if not_adapters or unexpected:
            raise PeftCheckpointError(
                f"checkpoint does not fit the adapted model: missing {not_adapters[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        if missing and missing != adapters:
            raise PeftCheckpointError(f"checkpoint holds some adapters but not {sorted(missing)[:5]}")
        if not missing:
            return
        for m in model.modules():
            if isinstance(m, LoRALinear | DoRALinear):
                m.to_empty(device=device)
                m.initialize_parameters()
        for m in model.modules():
            if isinstance(m, DoRALinear):
                m.initialize_dora_magnitude()

    def metadata(self) -> dict[str, Any]:
        """``peft.json`` of a step folder: the adapter settings and the base they were trained on."""
        if self._metadata is None:
            base = base_fingerprint(self.base_dir)
            self._metadata = {"spec": self.spec.as_dict(), "base": base, "base_dir": str(self.base_dir)}
        return self._metadata


def trained_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the parameters with ``requires_grad`` (the adapters and the fully trained groups),
    matched by identity so that state-dict renames (``FusionEmbedding``) are followed."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return [k for k, v in model.state_dict(keep_vars=True).items() if id(v) in trainable]


def trained_state_dict(model: nn.Module, is_rank_zero: bool) -> dict[str, torch.Tensor]:
    """The trained parameters as full CPU tensors on rank 0 (empty elsewhere). Every rank must call it:
    each sharded parameter is all-gathered, in the same order on every rank."""
    out: dict[str, torch.Tensor] = {}
    params = model.state_dict(keep_vars=True)
    for key in trained_keys(model):
        value = params[key].detach()
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        if is_rank_zero:
            out[key] = full.cpu().clone()
    return out
