"""The model, tokenizer and data sections of the config (sources, validate, preprocess, evaluate, synthetic)."""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)


class ConfigError(ValueError):
    """A config problem; ``errors`` holds one line per problem: ``file: path: message``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Component(BaseModel):
    """A torchtune-style ``_component_`` section: a dotted path plus keyword arguments."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    component: str = Field(alias="_component_", description="Dotted path of the callable to instantiate.")


# The LoRA arguments of the lora_* builders and their defaults (torchtune's names).
LORA_DEFAULTS: dict[str, Any] = {
    "lora_attn_modules": ["q_proj", "v_proj"],
    "apply_lora_to_mlp": False,
    "apply_lora_to_output": False,
    "lora_rank": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "use_dora": False,
    "quantize_base": False,
}


class ModelSection(_Strict):
    """Arguments of the model builder. The ``lora_*`` builders (``lora_docev_tiny``, ``lora_docev_preview``)
    also take torchtune's LoRA arguments; ``decoder_trainable`` then defaults to false (the adapters train,
    the decoder's base stays frozen) and the other flags keep their meaning for the groups without adapters."""

    component: str = Field("docev.models.docev.docev_tiny", alias="_component_")
    decoder_trainable: bool | None = Field(None, description="Default: true, false for the lora_* builders.")
    encoder_trainable: bool = False
    fusion_trainable: bool = True
    image_token_id: int | None = Field(None, description="Token id of <image>; must match the tokenizer.")
    tile_size: int | None = None
    patch_size: int | None = None
    max_num_tiles: int | None = None
    min_num_tiles: int | None = None
    attention: Literal["auto", "sdpa", "flex"] = Field(
        "auto",
        description="Mask of packed rows: flex (a BlockMask from document ids; fused kernel), sdpa (dense "
        "block-causal mask; CPU training, as flex has no backward on CPU), auto (flex on CUDA sm75+).",
    )
    lora_attn_modules: list[Literal["q_proj", "k_proj", "v_proj", "output_proj"]] | None = None
    apply_lora_to_mlp: bool | None = None
    apply_lora_to_output: bool | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    use_dora: bool | None = Field(None, description="DoRA (torchtune DoRALinear) instead of LoRA.")
    quantize_base: bool | None = Field(None, description="QLoRA: the decoder's frozen weights in NF4 (torchao).")

    @property
    def is_lora(self) -> bool:
        return self.component.rpartition(".")[2].startswith("lora_")

    @model_validator(mode="after")
    def _defaults(self) -> ModelSection:
        if self.decoder_trainable is None:
            self.decoder_trainable = not self.is_lora
        if self.is_lora:
            for key, value in LORA_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, copy.copy(value))
        return self

    @model_serializer(mode="wrap")
    def _drop_unset_lora(self, handler: Any) -> dict[str, Any]:
        # Full fine-tuning builders take no LoRA arguments: leave them out of what the recipe instantiates.
        data = handler(self)
        return {k: v for k, v in data.items() if k not in LORA_DEFAULTS or v is not None}

    def lora_args(self) -> dict[str, Any]:
        """The LoRA arguments of a ``lora_*`` builder (empty otherwise)."""
        return {k: getattr(self, k) for k in LORA_DEFAULTS} if self.is_lora else {}


class TokenizerSection(_Strict):
    """The model transform: ``_component_`` (a callable returning a ``DocEVTransform``) and its arguments
    (those of ``docev.data.transform.docev_preview_transform``)."""

    component: str = Field("docev.data.transform.docev_preview_transform", alias="_component_")

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments ``_component_`` is called with."""
        return self.model_dump(exclude={"component"})

    model_name_or_path: str
    image_token: str = "<image>"
    image_token_id: int | None = None
    stop_tokens: list[str] = ["<|im_end|>"]
    tile_size: int = 560
    patch_size: int = 14
    max_num_tiles: int = Field(9, ge=1)
    min_num_tiles: int = Field(1, ge=1)
    vision_feature_select_strategy: Literal["full", "default"] = "full"
    sampling_ratio: list[int] = [2, 3]
    apply_random_sampling_ratio: bool = True
    max_seq_len: int = Field(8192, gt=0)
    chat_template: str = Field(
        "docev_chatml", description="A bundled template name (docev_chatml) or an inline Jinja2 template."
    )
    add_vision_id: bool = False
    overflow_policy: list[Literal["larger_ratio", "truncate_text", "drop"]] = [
        "larger_ratio",
        "truncate_text",
        "drop",
    ]
    ufx_type: Literal["instruction", "pretrain"] = "instruction"

    @field_validator("vision_feature_select_strategy")
    @classmethod
    def _no_cls_token(cls, v: str) -> str:
        if v == "default":
            raise ValueError(
                "'default' drops token 0 (CLIP's CLS token); DocEV's SigLIP encoder has no CLS token, "
                "so it would drop a real image patch. Use 'full'."
            )
        return v

    @field_validator("max_num_tiles")
    @classmethod
    def _anyres_limit(cls, v: int) -> int:
        if v > 9:
            raise ValueError("at most 9 (DocEV's anyres grids are 1..9 tiles)")
        return v

    @field_validator("sampling_ratio")
    @classmethod
    def _some_ratio(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("needs at least one ratio")
        return v


class CheckpointerSection(_Strict):
    component: str = Field("docev.models.docev.DocEVCheckpointer", alias="_component_")
    checkpoint_dir: str
    checkpoint_files: list[str] | dict[str, str] | None = None
    model_type: str = "DOCEV"
    output_dir: str | None = None


class StorageOptions(_Strict):
    """Non-secret options of an fsspec store. Credentials never go here: the store's own chain finds them
    (environment, pod identity, ``kubernetes.storage_secret`` as env)."""

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph RGW): http://minio:9000")
    region: str | None = None
    anon: bool = Field(False, description="Unsigned requests (public buckets).")
    retries: int = Field(6, ge=0, description="Retries of a transient fault (throttling, 5xx, dropped connection).")
    backoff_seconds: float = Field(0.5, ge=0, description="First retry delay; doubles per retry (capped at 30 s).")
    threads: int = Field(16, ge=1, description="Images fetched concurrently per worker process (I/O-bound).")

    @field_validator("endpoint_url")
    @classmethod
    def _no_userinfo(cls, v: str | None) -> str | None:
        if v is not None and "@" in v.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("must not carry credentials (user:password@); give them as environment variables")
        return v


def _check_store_url(url: str) -> str:
    """A URL's fsspec backend must be installed (local paths and file:// always are)."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{url!r}: no fsspec backend for {protocol}:// is installed ({exc})") from None
    return url


def is_store_url(path: str) -> bool:
    """An object-store URL (``s3://…``); local paths and ``file://`` are folders."""
    return "://" in path and path.split("://", 1)[0] not in ("file", "local")


class DatasetSource(_Strict):
    """One UFX source (DESIGN §5)."""

    source: str = Field(
        description="Folder or fsspec URL (s3://bucket/prefix, gs://…, az://…) holding a save_to_disk dataset or "
        "*.jsonl / *.parquet files; images resolve relative to it, in the same store."
    )
    storage_options: StorageOptions = StorageOptions()
    name: str | None = None
    weight: float = Field(1.0, gt=0)
    ufx_type: Literal["instruction", "pretrain"] = "instruction"
    context_col: str = "context"
    image_files_col: str = "image_files"
    new_system_prompt: str | None = None
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the records held out for evaluation (by a stable hash of the id)."
    )
    eval_records: int | None = Field(None, ge=1, description="At most this many held-out records of this source.")
    formatting: Literal["ufx", "llava", "sharegpt", "messages", "qa"] = Field(
        "ufx",
        description="The rows' shape, mapped into UFX records when read: ufx; llava (conversations of from/value, "
        "image or images); sharegpt (conversations or messages, from/value or role/content, system, images); "
        "messages (HF/TRL messages + images, paths or {bytes, path}); qa (question, answers, image: DocVQA-style "
        "evaluation sets). Other than ufx: instruction sources; *.json files (an array) are read too.",
    )
    embedded_images_dir: str | None = Field(
        None,
        description="Folder (shared by every task) where images embedded as bytes in the rows are written once, "
        "named by their sha256; default {work_dir}/embedded_images/<source name> for formats other than ufx.",
    )

    @model_validator(mode="after")
    def _formatting_reads_instructions(self) -> DatasetSource:
        if self.formatting != "ufx" and self.ufx_type != "instruction":
            raise ValueError(f"formatting {self.formatting!r} maps rows to instruction records; ufx_type must be "
                             "'instruction'")  # fmt: skip
        return self

    @field_validator("source")
    @classmethod
    def _backend_installed(cls, v: str) -> str:
        return _check_store_url(v)


class EvaluateSection(_Strict):
    """``docev evaluate``: greedy answers for the held-out split's assistant turns, scored (ANLS, EM, F1)."""

    batch_size: int = Field(8, ge=1, description="Prompts generated together (one padded KV cache).")
    max_new_tokens: int = Field(32, ge=1)
    sampling_ratio: int | None = Field(None, ge=1, description="Ratio of the prompts; default the largest.")
    max_questions: int | None = Field(None, ge=1, description="Score only the first N questions (quick checks).")
    anls_threshold: float = Field(0.5, gt=0, le=1, description="DocVQA's τ: a normalised distance ≥ τ scores 0.")
    report_examples: int = Field(12, ge=0, description="Pages shown in the HTML report (largest changes first).")


class DataloaderSection(_Strict):
    num_workers: int = Field(0, ge=0)
    shuffle: bool = True
    packed: bool = False
    merge_datasets: bool = True
    bucket_by_length: bool = False
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description="Pad S to a multiple of this (bounded compiled graphs); packed rows: null pads them to "
        "tokenizer.max_seq_len (one shape). S is always a multiple of the loss's num_output_chunks.",
    )
    pin_memory: bool = False
    prefetch_factor: int | None = None
    verify_checksums: bool = Field(True, description="sha256 every shard when training starts (corrupt = error).")
    cache_dir: str | None = Field(
        None,
        description="Node-local folder (e.g. an NVMe emptyDir): the shards are copied there once per node, verified, "
        "and memory-mapped from there; null reads them where preprocess wrote them.",
    )


class ValidateSection(_Strict):
    max_reject_fraction: float = Field(0.05, ge=0, le=1)
    min_image_size: int = Field(14, ge=1)
    max_image_pixels: int = Field(178_956_970, gt=0)
    allowed_roots: list[str] = []
    workers: int = Field(1, ge=1)
    thumbnails: int = Field(6, ge=0)
    fanout: int = Field(1, ge=1, description="KFP tasks validating shards of the sources in parallel.")
    max_line_bytes: int = Field(
        16 << 20,
        ge=1024,
        description="A jsonl line longer than this is rejected as line_too_long while it is read (never held "
        "whole), so one huge line cannot exhaust a validate pod's memory.",
    )


class PreprocessSection(_Strict):
    workers: int = Field(1, ge=1)
    records_per_shard: int = Field(256, ge=1)
    image_format: Literal["auto", "original", "png", "jpeg", "webp"] = Field(
        "auto",
        description="auto: per image the smaller of its original bytes and lossless WebP tiles (exact); original: "
        "the original bytes, tiled at load time (exact); png (exact, ~5× the originals); jpeg / webp: lossy.",
    )
    jpeg_quality: int = Field(95, ge=1, le=100)
    fanout: int = Field(1, ge=1, description="KFP tasks building shards in parallel (shard k goes to k % fanout).")


class SyntheticSection(_Strict):
    """The embedded default: ``docev run`` makes the tiny checkpoint and synthetic UFX data when missing."""

    records: int = Field(48, ge=1)
    seed: int = 0
    format: Literal["jsonl", "parquet", "hf"] = "jsonl"
    checkpoint_size: Literal["tiny"] = "tiny"
    data_dir: str
