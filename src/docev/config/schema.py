"""``DocEVConfig``: the root of the one config schema, and the rules that span its sections.

The sections themselves live in ``sections`` (torchtune's and the data steps') and ``jobs`` (training job,
export, Kubernetes); loading and error messages in ``loading``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from docev.config.jobs import ExportSection, KubernetesSection, TrainSection
from docev.config.sections import (
    LORA_DEFAULTS,
    CheckpointerSection,
    Component,
    DataloaderSection,
    DatasetSource,
    EvaluateSection,
    ModelSection,
    PreprocessSection,
    StorageOptions,
    SyntheticSection,
    TokenizerSection,
    ValidateSection,
    _check_store_url,
    _Strict,
    is_store_url,
)


class DocEVConfig(_Strict):
    """The whole run. Top-level keys mirror torchtune's recipe configs plus the pipeline sections."""

    output_dir: str = Field(
        description="Folder or fsspec URL (s3://bucket/prefix, gs://…, az://…) of the data outputs: validate/ and "
        "shards/. Everything else of the run goes to work_dir."
    )
    output_storage_options: StorageOptions = Field(
        StorageOptions(), description="Non-secret options of an object-store output_dir (endpoint, region, retries)."
    )
    work_dir: str | None = Field(
        None,
        description="Folder or volume of what is not a data output: checkpoints (unless checkpointer.output_dir "
        "says), training logs, evaluation, exports, the pipeline's config and task logs. Default: output_dir; "
        "required when output_dir is an object-store URL.",
    )
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cuda"
    dtype: Literal["bf16", "fp32"] = "bf16"
    master_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Dtype of the parameters, gradients and optimizer state; compute runs in `dtype` (FSDP2 "
        "mixed precision, fp32 gradient reduction). bf16 keeps everything in bf16 (half the memory of the "
        "trainable state; updates below half a bf16 ulp round away).",
    )

    model: ModelSection
    tokenizer: TokenizerSection
    checkpointer: CheckpointerSection
    resume_from_checkpoint: bool | Literal["auto"] = "auto"
    datasets: list[DatasetSource] = Field(min_length=1)
    eval_datasets: list[DatasetSource] = Field(
        [], description="UFX sources used only for evaluation (every record held out; eval_records caps them)."
    )
    dataloader: DataloaderSection = DataloaderSection()

    epochs: int = Field(1, ge=1)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    optimizer: Component
    optimizer_in_bwd: bool = False
    lr_scheduler: Component | None = None
    loss: Component
    clip_grad_norm: float | None = Field(1.0, gt=0)
    compile: bool = False
    enable_activation_checkpointing: bool = False
    enable_activation_offloading: bool = False
    metric_logger: Component
    log_every_n_steps: int = Field(1, ge=1)
    log_peak_memory_stats: bool = True
    save_every_n_steps: int = Field(100, ge=1)
    eval_every_n_steps: int | None = Field(
        None, ge=1, description="Eval loss every N steps (and at the end); null: only at the end."
    )
    eval_max_batches: int | None = Field(None, ge=1, description="Eval micro-batches per rank and ratio; null: all.")
    keep_last_n_checkpoints: int = Field(2, ge=1)
    checkpoint_format: Literal["dcp", "hf"] = Field(
        "dcp",
        description="step_N layout: 'dcp' = torch.distributed.checkpoint, every rank writes its own shards of the "
        "model and optimizer; 'hf' = the model gathered to rank 0 and written as HF safetensors (+ the full "
        "optimizer in recipe_state.pt). Export, generate and resume read both.",
    )
    enable_async_checkpointing: bool = Field(
        False,
        description="dcp only: the save copies the shards to host memory and writes them in the background while "
        "training continues; the next save (and the end of the run) waits for it.",
    )
    stop_after_steps: int | None = Field(
        None,
        ge=1,
        description="End this run after this global step, with a checkpoint; the lr schedule still spans every "
        "epoch, so a later run resumes on the same curve (time-boxed or preemptible jobs).",
    )

    validate_: ValidateSection = Field(ValidateSection(), alias="validate")
    preprocess: PreprocessSection = PreprocessSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    evaluate: EvaluateSection = EvaluateSection()
    kubernetes: KubernetesSection = KubernetesSection()
    synthetic: SyntheticSection | None = None

    def cross_checks(self) -> list[tuple[str, str]]:
        """Rules spanning sections, as (dotted path, message)."""
        errors = []
        errors += self._output_checks()
        tok = self.tokenizer
        for key in ("tile_size", "patch_size", "max_num_tiles", "min_num_tiles", "image_token_id"):
            m, t = getattr(self.model, key), getattr(tok, key)
            if m is not None and t is not None and m != t:
                errors.append((f"model.{key}", f"{m} disagrees with tokenizer.{key} = {t}; state it once"))
        if tok.tile_size % tok.patch_size:
            errors.append(("tokenizer.tile_size", f"{tok.tile_size} is not a multiple of patch_size {tok.patch_size}"))
        if tok.min_num_tiles > tok.max_num_tiles:
            errors.append(("tokenizer.min_num_tiles", f"{tok.min_num_tiles} > max_num_tiles {tok.max_num_tiles}"))
        side = tok.tile_size // tok.patch_size
        bad = [r for r in tok.sampling_ratio if not 1 <= r <= side]
        if bad:
            errors.append(("tokenizer.sampling_ratio", f"{bad} outside 1..{side} (the per-tile patch grid side)"))
        elif (s := side // max(tok.sampling_ratio)) * s >= tok.max_seq_len:
            errors.append(
                (
                    "tokenizer.max_seq_len",
                    f"{tok.max_seq_len} cannot hold one image: the base tile "
                    f"alone costs {s * s} tokens at sampling_ratio {max(tok.sampling_ratio)}",
                )
            )
        if self.master_dtype == "bf16" and self.dtype == "fp32":
            errors.append(
                ("master_dtype", "bf16 with dtype fp32: the master weights cannot be coarser than the compute dtype")
            )
        if self.enable_async_checkpointing and self.checkpoint_format != "dcp":
            errors.append(
                (
                    "enable_async_checkpointing",
                    f"needs checkpoint_format: dcp (is {self.checkpoint_format!r}): an hf save gathers to rank 0",
                )
            )
        if self.enable_async_checkpointing and self.model.is_lora:
            errors.append(
                (
                    "enable_async_checkpointing",
                    f"{self.model.component} saves only its adapter, gathered to rank 0 and written at once (a few "
                    "MB); set enable_async_checkpointing: false",
                )
            )
        errors += self._lora_checks()
        if self.dataloader.packed and self.dataloader.bucket_by_length:
            errors.append(
                (
                    "dataloader.bucket_by_length",
                    "excludes dataloader.packed: packing already fills rows to max_seq_len; choose one",
                )
            )
        flex = self.model.attention == "flex" or (self.model.attention == "auto" and self.device == "cuda")
        if self.compile and flex and self.dataloader.packed and self.dataloader.pad_to_multiple_of is not None:
            errors.append(
                (
                    "dataloader.pad_to_multiple_of",
                    f"{self.dataloader.pad_to_multiple_of} with packed rows gives each batch its own S, and compiled "
                    "flex attention is static (one graph per S, past the recompile limit); set it to null: packed "
                    "rows are then all max_seq_len long",
                )
            )
        if self.model.quantize_base and self.train.nnodes > 1 and self.train.fsdp_strategy != "full":
            errors.append(
                (
                    "train.fsdp_strategy",
                    f"{self.train.fsdp_strategy} on {self.train.nnodes} nodes with QLoRA (model.quantize_base): "
                    "hybrid sharding's 2-D mesh meets torchtune's NF4 sharding, which supports a 1-D mesh only; set "
                    "train.fsdp_strategy: full (and a gradient_reduction other than last_micro_batch_across_nodes)",
                )
            )
        errors += self._split_checks()
        return errors

    @model_validator(mode="after")
    def _embedded_images_dirs(self) -> DocEVConfig:
        """Every task reads a source's embedded images from the same folder: on the volume, by default."""
        for d in (*self.datasets, *self.eval_datasets):
            if d.formatting != "ufx" and d.embedded_images_dir is None:
                d.embedded_images_dir = str(self.work_root / "embedded_images" / (d.name or Path(d.source).name))
        return self

    @property
    def work_root(self) -> Path:
        """The folder of checkpoints, logs, evaluation, exports and the pipeline's files (see ``work_dir``)."""
        return Path(self.work_dir or self.output_dir)

    def _output_checks(self) -> list[tuple[str, str]]:
        """An object-store output_dir holds the data outputs only: the rest needs a filesystem (renames, mmap)."""
        errors = []
        remote = is_store_url(self.output_dir)
        if remote:
            try:
                _check_store_url(self.output_dir)
            except ValueError as exc:
                errors.append(("output_dir", str(exc)))
            if self.work_dir is None:
                errors.append(("work_dir", f"required with an object-store output_dir ({self.output_dir}): a "
                               "folder or volume for checkpoints, logs, evaluation and exports"))  # fmt: skip
            if self.dataloader.cache_dir is None:
                errors.append(("dataloader.cache_dir", f"required with an object-store output_dir ({self.output_dir})"
                               ": the node-local folder training stages the shards to, then memory-maps"))  # fmt: skip
        for key, value in (("work_dir", self.work_dir), ("checkpointer.output_dir", self.checkpointer.output_dir),
                           ("dataloader.cache_dir", self.dataloader.cache_dir)):  # fmt: skip
            if value is not None and is_store_url(value):
                errors.append((key, f"{value!r}: must be a folder or volume (checkpoints, logs and the shard cache "
                               "are written with renames and memory-mapped; set work_dir to one when output_dir is "
                               "an object store); only output_dir, dataset sources and export.destination may be "
                               "object-store URLs"))  # fmt: skip
        return errors

    def _split_checks(self) -> list[tuple[str, str]]:
        errors = []
        for i, d in enumerate(self.datasets):
            if d.eval_records is not None and d.eval_fraction == 0:
                errors.append((f"datasets.{i}.eval_records", "caps the held-out records: set eval_fraction too"))
        for i, d in enumerate(self.eval_datasets):
            if d.eval_fraction:
                errors.append((f"eval_datasets.{i}.eval_fraction", "an eval-only source is held out whole; remove it"))
        names = [d.name or Path(d.source).name for d in (*self.datasets, *self.eval_datasets)]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            errors.append(("eval_datasets" if self.eval_datasets else "datasets", f"source name {dup!r} used twice"))
        r = self.evaluate.sampling_ratio
        if r is not None and r not in self.tokenizer.sampling_ratio:
            errors.append(("evaluate.sampling_ratio", f"{r} is not one of tokenizer.sampling_ratio"))
        return errors

    def _lora_checks(self) -> list[tuple[str, str]]:
        """LoRA arguments only on a lora_* builder, and no combination that cannot train."""
        m = self.model
        if not m.is_lora:
            given = [k for k in LORA_DEFAULTS if getattr(m, k) is not None]
            return [(f"model.{k}", f"{m.component} takes no LoRA arguments (use a lora_* builder)") for k in given]
        from docev.models.lora_rules import lora_problems

        args = {**m.lora_args(), "decoder_trainable": m.decoder_trainable}
        return [(f"model.{key}", why) for key, why in lora_problems(**args)]

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections (for caches and shard compatibility)."""
        data = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps({s: data[s] for s in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config, for editors (``docev config schema``)."""
    return DocEVConfig.model_json_schema(by_alias=True)
