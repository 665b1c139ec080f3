"""The one config schema.

A single YAML file drives every pipeline step. The torchtune sections keep their
keys (``_component_`` + keyword arguments) so the recipe can ``config.instantiate``
them; the pipeline sections (``validate``, ``preprocess``, ``train``, ``export``,
``kubernetes``) are ours. Loading = ``yaml.safe_load`` → OmegaConf (for ``${...}``
interpolation and ``a.b=value`` overrides) → pydantic validation. Every error names
the file, the dotted path, and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
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
    """Arguments of ``docev.data.transform.docev_preview_transform``."""

    component: str = Field("docev.data.transform.docev_preview_transform", alias="_component_")
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


# Kubernetes object names: DNS-1123 labels (namespaces) and subdomains (most other objects).
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_EXTENDED_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _k8s_name(value: str | None, pattern: re.Pattern[str], limit: int, what: str) -> str | None:
    if value is not None and (len(value) > limit or not pattern.match(value)):
        raise ValueError(f"{value!r} is not a valid Kubernetes {what} (lowercase a-z, 0-9, '-', at most {limit} chars)")
    return value


class StepResources(_Strict):
    """CPU and memory of one pod; quantities use Kubernetes syntax (``8``, ``500m``, ``64Gi``)."""

    cpu: str = "4"
    memory: str = "16Gi"

    @field_validator("*", mode="before")
    @classmethod
    def _number_as_quantity(cls, v: Any) -> Any:
        # YAML reads `cpu: 8` as an int; Kubernetes quantities are strings.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, v: str) -> str:
        return _positive_quantity(v)


def _positive_quantity(v: str) -> str:
    from kubernetes.utils import parse_quantity

    try:
        amount = parse_quantity(v)
    except ValueError:
        raise ValueError(f"{v!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)") from None
    if amount <= 0:
        raise ValueError(f"{v!r} must be positive")
    return v


class Resources(StepResources):
    """Per-node (per-pod) resources of the training job."""

    cpu: str = "8"
    memory: str = "64Gi"
    gpu: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    gpu_type: str | None = None
    shm_size: str = Field("16Gi", description="Size limit of the memory-backed /dev/shm (counts against memory).")
    extra: dict[str, str] = Field(
        {},
        description="Extra device resources per pod, e.g. {'rdma/ib': '1'} for an RDMA/InfiniBand device plugin "
        "(requests = limits). Off by default.",
    )
    ipc_lock: bool = Field(
        False,
        description="Add the IPC_LOCK capability (RDMA needs to pin memory); every other capability stays dropped.",
    )

    @field_validator("shm_size")
    @classmethod
    def _shm_quantity(cls, v: str) -> str:
        return _positive_quantity(v)

    @field_validator("extra", mode="before")
    @classmethod
    def _extra_resources(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for name, amount in v.items():
            if not isinstance(name, str) or not _EXTENDED_RESOURCE.match(name):
                raise ValueError(f"{name!r} is not an extended resource name (domain/name, e.g. rdma/ib)")
            if name.split("/")[0].endswith("kubernetes.io"):
                raise ValueError(f"{name!r}: kubernetes.io resources are not extended resources")
            out[name] = _positive_quantity(str(amount))
        return out

    @model_validator(mode="after")
    def _gpu_not_extra(self) -> Resources:
        if self.gpu_resource in self.extra:
            raise ValueError(f"extra: {self.gpu_resource} is the GPU resource; set it with gpu")
        return self


FsdpStrategy = Literal["auto", "full", "hybrid"]
GradientReduction = Literal["every_micro_batch", "last_micro_batch", "last_micro_batch_across_nodes"]


def resolve_strategy(strategy: FsdpStrategy, nnodes: int) -> Literal["full", "hybrid"]:
    """``train.fsdp_strategy`` ``auto``: hybrid across several nodes, full sharding on one."""
    if strategy == "auto":
        return "hybrid" if nnodes > 1 else "full"
    return strategy


class RunPolicy(_Strict):
    """The PyTorchJob's ``runPolicy`` (``train.timeout_seconds`` becomes its ``activeDeadlineSeconds``). For a
    TrainJob, ``backoff_limit`` and ``ttl_seconds_after_finished`` live in the ClusterTrainingRuntime (its node
    Job's ``backoffLimit``, the JobSet's TTL) and ``clean_pod_policy`` has no equivalent."""

    clean_pod_policy: Literal["None", "Running", "All"] = Field(
        "Running",
        description="Which pods the operator deletes when the job ends. 'Running' stops stragglers but keeps "
        "finished pods, so the launcher can still read a failed pod's log.",
    )
    backoff_limit: int = Field(3, ge=0, description="Pod restarts (restartPolicy OnFailure) before the job fails.")
    ttl_seconds_after_finished: int | None = Field(
        7 * 24 * 3600, ge=0, description="Delete a finished job (and its pods) after this long; null keeps it."
    )


class TrainSection(_Strict):
    backend: Literal["local", "kubernetes", "trainjob"] = Field(
        "local",
        description="local: torchrun in this process/pod; kubernetes: a Training Operator v1 PyTorchJob; "
        "trainjob: a Kubeflow Trainer v2 TrainJob on the ClusterTrainingRuntime train.runtime.",
    )
    runtime: str = Field(
        "docev-torch-distributed",
        description="The ClusterTrainingRuntime a TrainJob references (manifests/runtimes; backend trainjob).",
    )
    nnodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    image: str = "ghcr.io/docev/docev-pipelines:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    resources: Resources = Resources()
    timeout_seconds: int = Field(7 * 24 * 3600, gt=0)
    delete_job_on_success: bool = True
    run_policy: RunPolicy = RunPolicy()
    poll_seconds: float = Field(10.0, gt=0, description="How often the launcher reads the job's status.")
    failure_log_lines: int = Field(50, ge=1, description="Log lines of the failing pod quoted in the step's error.")
    collective_timeout_seconds: int = Field(
        1800,
        gt=0,
        description="Process-group timeout: a collective waiting longer on a silent rank fails the job instead "
        "of hanging it (torchrun already stops every rank when one exits).",
    )
    termination_grace_seconds: int = Field(
        600,
        gt=0,
        description="Time from SIGTERM (preemption, node drain) to SIGKILL: the pods' "
        "terminationGracePeriodSeconds and torchrun's --shutdown-timeout. Must cover finishing the step in "
        "flight plus one checkpoint save (the log's 'Saved ... in N s').",
    )

    nccl_env: dict[str, str] = Field(
        {},
        description="NCCL_* variables for the training pods (e.g. NCCL_IB_HCA, NCCL_SOCKET_IFNAME); off by default.",
    )
    fsdp_strategy: FsdpStrategy = Field(
        "auto",
        description="FSDP2 mesh: full (shard over all ranks) or hybrid (shard within a node of nproc_per_node "
        "ranks, replicate across nodes); auto = hybrid when nnodes > 1.",
    )
    gradient_reduction: GradientReduction = Field(
        "every_micro_batch",
        description="When gradients are reduced within a step: every micro-batch; only the last (no collective "
        "before it, but every rank holds unsharded gradients of all trainable parameters in between); or "
        "(hybrid) reduce-scatter in the node every micro-batch, all-reduce across nodes on the last only.",
    )

    @field_validator("runtime")
    @classmethod
    def _runtime_name(cls, v: str) -> str:
        return _k8s_name(v, _DNS1123_SUBDOMAIN, 253, "object name")

    @field_validator("nccl_env", mode="before")
    @classmethod
    def _nccl_names(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str) or not re.fullmatch(r"NCCL_[A-Z0-9_]+", k)]
            if bad:
                raise ValueError(f"{bad}: only NCCL_* variables (upper case) go here")
            return {k: str(val) for k, val in v.items()}
        return v

    @model_validator(mode="after")
    def _reduction_needs_hybrid(self) -> TrainSection:
        full = resolve_strategy(self.fsdp_strategy, self.nnodes) == "full"
        if self.gradient_reduction == "last_micro_batch_across_nodes" and full and self.nnodes > 1:
            raise ValueError(
                "gradient_reduction: last_micro_batch_across_nodes needs hybrid sharding across nodes (full "
                "sharding reduce-scatters across nodes every micro-batch); use last_micro_batch"
            )
        return self


_BYTE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_byte_size(text: str) -> int:
    """``"5GB"`` → 5·10⁹ bytes, ``"1MiB"`` → 2²⁰ (transformers' ``max_shard_size`` convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _BYTE_UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


class ExportSection(_Strict):
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    max_shard_size: str = "5GB"
    destination: str | None = Field(
        None, description="Folder or fsspec URI (s3://…) of the export; default {output_dir}/export."
    )
    checkpoint: str = Field(
        "latest", description="latest, best, step_N (under checkpointer.output_dir), base, or a folder."
    )
    overwrite: bool = Field(False, description="Replace an existing export (swapped in whole); else refuse.")
    smoke_prompt: str = "What does this document say?"
    smoke_max_new_tokens: int = Field(16, ge=1)

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_byte_size(v)
        return v

    @property
    def max_shard_bytes(self) -> int:
        return parse_byte_size(self.max_shard_size)


class Toleration(_Strict):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _api_rules(self) -> Toleration:
        # The API server's rules for a toleration (core/v1 validation).
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is 'Exists'")
        if self.operator == "Equal" and not self.key:
            raise ValueError("operator 'Equal' needs a key (use operator 'Exists' to tolerate every taint)")
        return self


class KubernetesSection(_Strict):
    namespace: str = "docev"
    service_account: str = "docev-pipeline"
    pvc: str = Field("docev-data", description="Shared volume for data and outputs, mounted at mount_path.")
    mount_path: str = "/mnt/docev"
    checkpoint_pvc: str | None = Field(
        "docev-checkpoints",
        description="Volume for checkpoints, mounted over the checkpoint folder (the same path as on the data "
        "volume, via subPath); null keeps checkpoints on the data volume.",
    )
    storage_class: str | None = None
    wandb_secret: str | None = "docev-wandb"
    wandb_secret_key: str = "api-key"
    storage_secret: str | None = Field(
        None,
        description="Secret with object-store credentials, given as env to every data/train/export pod; null: the "
        "pods' own identity (IRSA, workload identity) or no credentials.",
    )
    storage_secret_keys: dict[str, str] = Field(
        default_factory=lambda: {"access-key-id": "AWS_ACCESS_KEY_ID", "secret-access-key": "AWS_SECRET_ACCESS_KEY"},
        description="Key in storage_secret → environment variable the store's client reads.",
    )
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    step_resources: dict[Literal["validate", "preprocess", "export", "evaluate"], StepResources] = Field(
        default_factory=lambda: {
            "validate": StepResources(cpu="4", memory="16Gi"),
            "preprocess": StepResources(cpu="16", memory="64Gi"),
            "export": StepResources(cpu="8", memory="128Gi"),
            "evaluate": StepResources(cpu="8", memory="128Gi"),
        },
        description="CPU/memory limits of the pipeline's data, evaluate and export tasks (train: train.resources).",
    )
    run_as_user: int = Field(1000, ge=1, description="Non-root uid of the training pods (the image's user).")
    run_as_group: int = Field(1000, ge=0)
    fs_group: int = Field(1000, ge=0, description="Group owning the mounted volumes, so the non-root user can write.")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        return _k8s_name(v, _DNS1123_LABEL, 63, "namespace name")

    @field_validator("storage_secret_keys")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key, env in v.items():
            cls._secret_key(key)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env):
                raise ValueError(f"{env!r} is not an environment variable name")
        return v

    @field_validator("service_account", "pvc", "checkpoint_pvc", "wandb_secret", "storage_secret")
    @classmethod
    def _object_name(cls, v: str | None) -> str | None:
        return _k8s_name(v, _DNS1123_SUBDOMAIN, 253, "object name")

    @field_validator("wandb_secret_key")
    @classmethod
    def _secret_key(cls, v: str) -> str:
        if not re.fullmatch(r"[-._a-zA-Z0-9]{1,253}", v):
            raise ValueError(f"{v!r} is not a valid Secret key (letters, digits, '-', '_', '.')")
        return v

    @field_validator("mount_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") == "":
            raise ValueError(f"{v!r} must be an absolute path below / (where the pods mount the volume)")
        return v.rstrip("/")


class SyntheticSection(_Strict):
    """The embedded default: ``docev run`` makes the tiny checkpoint and synthetic UFX data when missing."""

    records: int = Field(48, ge=1)
    seed: int = 0
    format: Literal["jsonl", "parquet", "hf"] = "jsonl"
    checkpoint_size: Literal["tiny"] = "tiny"
    data_dir: str


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
        None, ge=1, description="Validation loss every N steps (and at the end); null: only at the end."
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
        errors += self._split_checks()
        return errors

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
        from docev.models.docev import lora_problems

        args = {**m.lora_args(), "decoder_trainable": m.decoder_trainable}
        return [(f"model.{key}", why) for key, why in lora_problems(**args)]

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections (for caches and shard compatibility)."""
        data = self.model_dump(mode="json", by_alias=True)
        blob = json.dumps({s: data[s] for s in sections}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# ---------------------------------------------------------------------------------------------
# Loading


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``5e-4`` as a float (YAML 1.1 wants ``5.0e-4``)."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+)$"),
    list("-+0123456789."),
)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b.c=value`` → (path, yaml-parsed value). Bad syntax is a ConfigError."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError([f"override {item!r}: expected key.sub=value (e.g. optimizer.lr=2e-5)"])
        try:
            value = safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError([f"override {item!r}: value is not valid YAML ({exc.problem})"]) from exc
        out.append((key, value))
    return out


def load_raw(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """YAML (safe) + overrides + ``${...}`` interpolation, before schema validation."""
    path = Path(path)
    try:
        data = safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return resolve(data, overrides or [], origin=str(path))


def resolve(data: dict[str, Any], overrides: list[str], origin: str = "<config>") -> dict[str, Any]:
    """Apply overrides and resolve interpolations on an already-parsed mapping."""
    cfg = OmegaConf.create(data)
    for key, value in parse_overrides(overrides):
        try:
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as exc:
            raise ConfigError([f"{origin}: override {key}: {_omega_msg(exc)}"]) from exc
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", "") or "?"
        raise ConfigError([f"{origin}: {where}: interpolation failed: {_omega_msg(exc)}"]) from exc


def _omega_msg(exc: Exception) -> str:
    return str(exc).splitlines()[0]


def load_config(path: str | Path, overrides: list[str] | None = None) -> DocEVConfig:
    """Load, override, interpolate, validate. Raises ConfigError listing every problem."""
    return validate_dict(load_raw(path, overrides), origin=str(path))


def validate_dict(data: dict[str, Any], origin: str = "<config>") -> DocEVConfig:
    try:
        cfg = DocEVConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_format_error(err, origin) for err in exc.errors()]) from None
    errors = [f"{origin}: {path}: {msg}" for path, msg in cfg.cross_checks()]
    for name in COMPONENT_SECTIONS:
        errors += [f"{origin}: {name}.{msg}" for msg in _component_errors(getattr(cfg, name))]
    if errors:
        raise ConfigError(errors)
    return cfg


COMPONENT_SECTIONS = ("optimizer", "lr_scheduler", "loss", "metric_logger")
# Arguments the recipe passes itself; a config must not set them.
_RECIPE_SUPPLIED = {"params", "optimizer", "num_training_steps"}


def _component_errors(section: Component | None) -> list[str]:
    """Check a ``_component_`` section against the callable's signature: importable, known keyword
    arguments (with a suggestion), and simple scalar types. Messages start with the sub-path."""
    if section is None:
        return []
    path = section.component
    module_name, _, attr = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        return [f"_component_: cannot import {path!r}"]
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    names = [n for n in params if n not in _RECIPE_SUPPLIED]
    errors = []
    for key, value in (section.model_extra or {}).items():
        if key not in params or key in _RECIPE_SUPPLIED:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (accepted: {', '.join(names)})"
            errors.append(f"{key}: unknown argument of {path}{hint}")
            continue
        expected = params[key].default
        if isinstance(expected, bool) and not isinstance(value, bool):
            errors.append(f"{key}: expected a boolean, got {value!r}")
        elif isinstance(expected, int | float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            errors.append(f"{key}: expected a number, got {value!r}")
    return errors


def _format_error(err: dict[str, Any], origin: str) -> str:
    loc = [str(p) for p in err["loc"]]
    path = ".".join(loc) or "<top>"
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key" + _suggest(loc)
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and kind not in ("value_error",) and not isinstance(err["input"], dict | list):
            msg += f" (got {err['input']!r})"
    return f"{origin}: {path}: {msg}"


def _suggest(loc: list[str]) -> str:
    """'did you mean' for an unknown key, from the fields of the model at that location."""
    model: Any = DocEVConfig
    for part in loc[:-1]:
        if part.isdigit():
            continue
        field = _field(model, part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(sorted(names))})"


def _field(model: type[BaseModel], name: str):
    for fname, f in model.model_fields.items():
        if name in (fname, f.alias):
            return f
    return None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def json_schema() -> dict[str, Any]:
    """JSON Schema of the config, for editors (``docev config schema``)."""
    return DocEVConfig.model_json_schema(by_alias=True)
