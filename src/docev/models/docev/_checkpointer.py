"""Checkpointer for ``checkpointer._component_``: DocEV folders in (HF or DCP), HF-format folders out.

An HF training checkpoint is itself a loadable HF checkpoint (so export and resume read the same
thing): ``step_N/`` holds the sharded safetensors + index, ``config.json`` (dtype updated), the
tokenizer/processor/template files copied from the source folder, and ``recipe_state.pt`` when
the recipe saves more than the model. A DCP ``step_N`` (``checkpoint_format: dcp``, written by
``docev.training.checkpoint_manager``) has the same side files with the weights as DCP shards; this
class reads its model consolidated in one process, so export and generate take either.
``latest`` names the newest complete folder; folders are written under a temporary name and
renamed (``partial_folder`` / ``publish``), so a crash never leaves a half-written ``step_N``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from docev.models.docev._arch import hf_param_shapes
from docev.models.docev._convert_weights import (
    arch_from_hf_config,
    check_hf_state_dict,
    docev_hf_to_tune,
    docev_tune_to_hf,
)
from docev.models.docev._dcp import is_dcp_folder, read_dcp_model
from docev.models.docev._folder import INDEX, PEFT_META, TRAINED_FILE, save_sharded, side_files
from docev.models.docev._sliced import open_rows
from docev.run.checkpoints import RECIPE_STATE, partial_folder, publish_step
from docev.run.digests import seal, verify_checkpoint

DCP_WHERE = "DCP shards"


class DocEVCheckpointer:
    """Load a DocEV HF checkpoint as a torchtune state dict; save torchtune state dicts as HF folders.

    Args:
        checkpoint_dir (str | Path): folder with ``config.json`` and the weights (a base model or a ``step_N``).
        checkpoint_files (Sequence[str] | Mapping[str, str] | None): weight files inside ``checkpoint_dir``;
            None reads ``model.safetensors.index.json`` (else every ``*.safetensors``, else
            ``pytorch_model*.bin``); torchtune's ``{"filename_format", "max_filename"}`` form is accepted.
        model_type (str): must be ``DOCEV``.
        output_dir (str | Path | None): where ``save_checkpoint`` writes ``step_N/`` and ``latest``.
        max_shard_bytes (int): shard size limit of saved safetensors files.
        verify (bool): check the folder against its ``checkpoint_manifest.json`` first, when it has one (the
            recipe passes False: its ranks have verified the folder between them).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        checkpoint_files: Sequence[str] | Mapping[str, str] | None = None,
        model_type: str = "DOCEV",
        output_dir: str | Path | None = None,
        max_shard_bytes: int = 5_000_000_000,
        verify: bool = True,
    ):
        if model_type.upper() != "DOCEV":
            raise ValueError(f"checkpointer.model_type {model_type!r}: this checkpointer reads DOCEV checkpoints only")
        self.checkpoint_dir = Path(checkpoint_dir)
        if verify:
            verify_checkpoint(self.checkpoint_dir, required=False)
        config_path = self.checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"checkpointer.checkpoint_dir: {config_path} does not exist")
        self.hf_config = json.loads(config_path.read_text())
        self.arch = arch_from_hf_config(self.hf_config, origin=str(config_path))
        self.is_dcp = is_dcp_folder(self.checkpoint_dir)
        self.checkpoint_files = [] if self.is_dcp else self._resolve_files(checkpoint_files)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_shard_bytes = max_shard_bytes
        # Checkpoint tensors the model has no parameter for, carried into every save (set by a load).
        self.unused: dict[str, torch.Tensor] | None = None

    def _resolve_files(self, files: Sequence[str] | Mapping[str, str] | None) -> list[Path]:
        d = self.checkpoint_dir
        if (d / TRAINED_FILE).is_file():
            raise ValueError(
                f"{d} is a checkpoint of an adapter run ({TRAINED_FILE}: the trained tensors only); it is read "
                "over its base checkpoint (docev.training.peft), or exported (docev export)"
            )
        if files is None:
            index = d / INDEX
            if index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            else:
                names = sorted(p.name for p in d.glob("*.safetensors")) or sorted(
                    p.name for p in d.glob("pytorch_model*.bin")
                )
            if not names:
                raise FileNotFoundError(f"{d}: no model.safetensors.index.json, *.safetensors or pytorch_model*.bin")
        elif isinstance(files, Mapping):
            try:
                fmt, last = files["filename_format"], str(files["max_filename"])
            except KeyError as exc:
                raise ValueError(f"checkpointer.checkpoint_files: the mapping form needs {exc.args[0]!r}") from None
            names = [fmt.format(str(i).zfill(len(last)), last) for i in range(1, int(last) + 1)]
        else:
            names = list(files)
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpointer.checkpoint_files: {missing} not found in {d}")
        return [d / n for n in names]

    def load_hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as stored (HF layout, unused tensors included), checked against the architecture.
        Reads no ``recipe_state.pt``: export wants the weights without the optimizer state. A DCP folder is
        consolidated from every rank's shards (its optimizer entries are not read)."""
        if self.is_dcp:
            model, unused = read_dcp_model(self.checkpoint_dir)
            tensors = docev_tune_to_hf(model, self.arch)
            tensors.update(unused)
            check_hf_state_dict(tensors, self.arch, dict.fromkeys(tensors, DCP_WHERE))
            return tensors
        tensors = {}
        where: dict[str, str] = {}
        for path in self.checkpoint_files:
            for key, value in _read_weights(path).items():
                if key in tensors:
                    raise ValueError(f"{key} is in both {where[key]} and {path.name}")
                tensors[key], where[key] = value, path.name
        check_hf_state_dict(tensors, self.arch, where)
        return tensors

    def load_checkpoint(self) -> dict[str, Any]:
        """``{"model": torchtune state dict}`` plus the entries of ``recipe_state.pt`` when the folder has one."""
        model, self.unused = docev_hf_to_tune(self.load_hf_state_dict(), self.arch)
        return {"model": model, **self.load_recipe_state()}

    def open_checkpoint(self) -> dict[str, Any]:
        """``load_checkpoint`` for a training rank: ``"model"`` maps each torchtune key to a ``LazyRows`` that reads
        only the rows asked for (``docev.training.load`` fills a rank's shards with them); the unused tensors are
        read whole (small). A DCP folder has no such reader: it is read sharded (``CheckpointManager``) or whole."""
        if self.is_dcp:
            return self.load_checkpoint()
        model, self.unused = open_rows(self.checkpoint_files, self.arch)
        return {"model": model, **self.load_recipe_state()}

    def load_recipe_state(self) -> dict[str, Any]:
        """The entries of the folder's ``recipe_state.pt``; empty when it has none (a base model)."""
        recipe = self.checkpoint_dir / RECIPE_STATE
        return torch.load(recipe, map_location="cpu", weights_only=True) if recipe.is_file() else {}

    def save_checkpoint(
        self, state_dict: Mapping[str, Any], step: int, record: Mapping[str, Any] | None = None
    ) -> Path:
        """Write ``output_dir/step_{step}`` (HF layout, unused checkpoint tensors carried through) and
        point ``latest`` at it. Entries besides ``model`` go to ``recipe_state.pt``; ``record`` goes into
        the folder's manifest. Returns the folder."""
        if self.output_dir is None:
            raise ValueError("checkpointer.output_dir is not set; cannot save")
        if self.unused is None:
            raise RuntimeError("call load_checkpoint() before save_checkpoint(): unused tensors are carried from it")
        hf = docev_tune_to_hf(state_dict["model"], self.arch)
        hf.update(self.unused)
        order = list(hf_param_shapes(self.arch))
        ordered = {k: hf[k].contiguous() for k in order if k in hf}
        ordered.update({k: v.contiguous() for k, v in hf.items() if k not in ordered})

        tmp = self.partial_folder(step)
        save_sharded(ordered, tmp, self.max_shard_bytes)
        self.write_side_files(tmp, state_dict["model"]["image_newline"].dtype)
        extra = {k: v for k, v in state_dict.items() if k != "model"}
        if extra:
            torch.save(extra, tmp / RECIPE_STATE)
        return self.publish(tmp, step, record)

    def save_trained_checkpoint(
        self, state_dict: Mapping[str, Any], step: int, peft: Mapping[str, Any], record: Mapping[str, Any] | None = None
    ) -> Path:
        """``step_{step}`` of a run that trains adapters: ``state_dict["model"]`` holds the trained tensors
        only (torchtune names, written to ``trained_model.safetensors``), ``peft`` goes to ``peft.json``; the
        frozen weights stay in the base checkpoint. Same atomic folder and ``latest`` as ``save_checkpoint``."""
        tmp = self.partial_folder(step)
        model = {k: v.contiguous() for k, v in state_dict["model"].items()}
        save_file(model, str(tmp / TRAINED_FILE), metadata={"format": "pt"})
        (tmp / PEFT_META).write_text(json.dumps(dict(peft), indent=2))
        self.write_side_files(tmp, getattr(torch, str(self.hf_config.get("torch_dtype", "bfloat16"))))
        extra = {k: v for k, v in state_dict.items() if k != "model"}
        if extra:
            torch.save(extra, tmp / RECIPE_STATE)
        return self.publish(tmp, step, record)

    def partial_folder(self, step: int) -> Path:
        """An empty ``.step_{step}.partial`` in ``output_dir`` (``docev.run.checkpoints``)."""
        if self.output_dir is None:
            raise ValueError("checkpointer.output_dir is not set; cannot save")
        return partial_folder(self.output_dir, step)

    def write_side_files(self, folder: Path, dtype: torch.dtype) -> None:
        """``config.json`` (``torch_dtype`` = the saved weights' dtype) and the tokenizer/processor/template
        files of the source folder."""
        for src in side_files(self.checkpoint_dir):
            shutil.copy2(src, folder / src.name)
        config = dict(self.hf_config)
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (folder / "config.json").write_text(json.dumps(config, indent=2))

    def publish(self, tmp: Path, step: int, record: Mapping[str, Any] | None = None) -> Path:
        """Seal the complete ``tmp`` (the digest of every file in its ``checkpoint_manifest.json``, with
        ``record``), rename it to ``step_{step}``, then point ``latest`` at it; ``docev.run.publish`` fsyncs
        files and folders first, so after a power loss ``latest`` never names bytes that are not on disk."""
        seal(tmp, step, record)
        return publish_step(self.output_dir, tmp, step)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
