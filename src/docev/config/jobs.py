"""How the jobs run: the train section (resources, sharding, run policy), export and kubernetes."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from docev.config.sections import (
    _Strict,
)

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


_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}  # fmt: skip


def parse_quantity(v: str) -> Decimal:
    """A Kubernetes resource quantity (``8``, ``500m``, ``64Gi``, ``1e3``) as a number; our own parser, so
    validating a config needs no Kubernetes client (the GPU check runs without one)."""
    match = _QUANTITY.match(str(v).strip())
    if match is None:
        raise ValueError(f"{v!r} is not a Kubernetes quantity")
    number, exponent, suffix = match.groups()
    amount = Decimal(number + (exponent or ""))
    return amount * _SUFFIX[suffix] if suffix else amount


def _positive_quantity(v: str) -> str:
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
        "flight plus one checkpoint save (the log's 'Saved ... in N s'); render-manifests and the launcher warn "
        "when the save alone, sized from the model at train.checkpoint_write_gb_per_second, would not fit.",
    )
    checkpoint_write_gb_per_second: float = Field(
        1.0,
        gt=0,
        description="Write bandwidth of the checkpoint volume in GB/s (10^9 bytes), all ranks' writes together "
        "(an hf save is written by rank 0 alone). Sizes the preemption save against termination_grace_seconds: "
        "one write of the step, two with enable_async_checkpointing (the save in flight first). The default "
        "suits a parallel or networked file system; measure yours: a save's bytes over the log's 'Saved ... in "
        "N s'.",
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
