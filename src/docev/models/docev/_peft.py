"""An adapter run's step folder, read by resume (``docev.training.peft``) and export alike: the adapter
settings it records (``PeftSpec``), the base it was trained on (``base_fingerprint``) and its trained
tensors (``read_trained``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torchtune.modules.peft import get_lora_module_names

from docev.models.docev._checkpointer import DocEVCheckpointer
from docev.models.docev._folder import INDEX, PEFT_META, TRAINED_FILE

if TYPE_CHECKING:
    from docev.config import ModelSection


class PeftCheckpointError(ValueError):
    """A step folder that does not fit this run's adapters or base."""


@dataclass(frozen=True)
class PeftSpec:
    """The adapter settings that a step folder records and a resumed run or an export must match."""

    method: str  # lora, dora, qlora or qdora
    rank: int
    alpha: float
    targets: list[str]  # torchtune module names (q_proj, ..., w1, w2, w3, output)
    lora_attn_modules: list[str]
    apply_lora_to_mlp: bool
    apply_lora_to_output: bool
    use_dora: bool
    quantize_base: bool
    dropout: float
    trained_groups: list[str] = field(default_factory=list)  # fully trained groups besides the adapters

    @classmethod
    def from_model(cls, model: ModelSection) -> PeftSpec | None:
        """None for a full fine-tuning builder."""
        if not model.is_lora:
            return None
        a = model.lora_args()
        targets = get_lora_module_names(list(a["lora_attn_modules"]), a["apply_lora_to_mlp"], a["apply_lora_to_output"])
        method = ("q" if a["quantize_base"] else "") + ("dora" if a["use_dora"] else "lora")
        groups = [g for g in ("encoder", "fusion") if getattr(model, f"{g}_trainable")]
        return cls(method=method, rank=a["lora_rank"], alpha=float(a["lora_alpha"]), targets=list(targets),
                   lora_attn_modules=list(a["lora_attn_modules"]), apply_lora_to_mlp=a["apply_lora_to_mlp"],
                   apply_lora_to_output=a["apply_lora_to_output"], use_dora=a["use_dora"],
                   quantize_base=a["quantize_base"], dropout=float(a["lora_dropout"]),
                   trained_groups=groups)  # fmt: skip

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_trained_only(folder: Path) -> bool:
    """A step folder of an adapter run (trained tensors only, read over the base)."""
    return (Path(folder) / TRAINED_FILE).is_file()


def base_fingerprint(base_dir: Path) -> dict[str, str]:
    """What identifies the base the adapters were trained on: sha256 of ``config.json`` (and of the weight
    index when there is one) and every weight file's size. Hashing 23 GB of weights at every save would
    cost a minute; a changed architecture, shard layout or file shows here."""
    base_dir = Path(base_dir)
    ckpt = DocEVCheckpointer(base_dir)
    out = {"config.json": _sha256(base_dir / "config.json")}
    index = base_dir / INDEX
    if index.is_file():
        out[index.name] = _sha256(index)
    out.update({f.name: f"{f.stat().st_size} bytes" for f in ckpt.checkpoint_files})
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_trained(folder: Path, spec: PeftSpec | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained tensors and ``peft.json`` of a step folder, checked against ``spec`` (None: no check)."""
    folder = Path(folder)
    meta = json.loads((folder / PEFT_META).read_text())
    if spec is not None:
        want = spec.as_dict()
        diff = [
            f"{k}: checkpoint {meta['spec'].get(k)!r}, config {want[k]!r}"
            for k in want
            if meta["spec"].get(k) != want[k]
        ]
        if diff:
            raise PeftCheckpointError(
                f"{folder} was trained with other adapter settings ({'; '.join(diff)}); resume needs the same "
                "model.* LoRA settings (start a new checkpointer.output_dir, or resume_from_checkpoint: false)"
            )
    return load_file(str(folder / TRAINED_FILE)), meta
