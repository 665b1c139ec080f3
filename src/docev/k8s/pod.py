"""The training pod, shared by both job kinds: volumes, /dev/shm, env, resources, security context, scheduling.

``render_pytorchjob`` puts all of it into each replica's pod template; ``render_runtime`` puts the
cluster-wide part into the ClusterTrainingRuntime and ``render_trainjob`` the per-run part (PVC volumes
and mounts, command, env, resources) into the TrainJob. Pod-level settings go through ``pod_spec`` so
that both kinds get every new one.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from docev.config import ConfigError, DocEVConfig
from docev.config.jobs import parse_quantity
from docev.models.arch import arch_of_component
from docev.models.checkpoint_size import checkpoint_write_bytes
from docev.run.paths import run_paths

SHM_VOLUME = "dshm"
SHM_MOUNT = {"name": SHM_VOLUME, "mountPath": "/dev/shm"}
# An Istio sidecar keeps a finished pod running and breaks torchrun's rendezvous.
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}


class VolumeMount(NamedTuple):
    """A PVC mounted into the training pods (``sub_path`` "" mounts the claim's root)."""

    volume: str
    claim: str
    mount_path: str
    sub_path: str


def volume_mounts(cfg: DocEVConfig) -> list[VolumeMount]:
    """The PVC mounts of the training pods. The checkpoint volume is mounted over the checkpoint folder with
    a subPath equal to that folder's path on the data volume, so paths are the same with or without it
    and runs with different output dirs do not share checkpoint folders. Other pods that read checkpoints
    (export) must mount the same way (``kfp.kubernetes.mount_pvc(..., sub_path=...)``)."""
    k8s = cfg.kubernetes
    mounts = [VolumeMount("data", k8s.pvc, k8s.mount_path, "")]
    if k8s.checkpoint_pvc:
        ckpt = PurePosixPath(run_paths(cfg).checkpoints)
        root = PurePosixPath(k8s.mount_path)
        if root not in ckpt.parents:
            raise ConfigError(
                [
                    f"checkpointer.output_dir: {ckpt} is not below kubernetes.mount_path {root}; "
                    "the checkpoint volume is mounted over a folder of the data volume"
                ]
            )
        mounts.append(VolumeMount("checkpoints", k8s.checkpoint_pvc, str(ckpt), str(ckpt.relative_to(root))))
    return mounts


def pvc_volumes(cfg: DocEVConfig) -> list[dict[str, Any]]:
    return [{"name": m.volume, "persistentVolumeClaim": {"claimName": m.claim}} for m in volume_mounts(cfg)]


def pvc_mounts(cfg: DocEVConfig) -> list[dict[str, Any]]:
    return [
        {"name": m.volume, "mountPath": m.mount_path, **({"subPath": m.sub_path} if m.sub_path else {})}
        for m in volume_mounts(cfg)
    ]


def shm_volume(cfg: DocEVConfig) -> dict[str, Any]:
    """A memory-backed /dev/shm (the default 64 MiB breaks dataloader workers and NCCL)."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.train.resources.shm_size}}


def env(cfg: DocEVConfig) -> list[dict[str, Any]]:
    """The training container's environment; the W&B key and object-store credentials only ever as references
    to their Secrets."""
    k8s = cfg.kubernetes
    out: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if k8s.wandb_secret:
        out.append(
            {
                "name": "WANDB_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": k8s.wandb_secret, "key": k8s.wandb_secret_key}},
            }
        )
    if k8s.storage_secret:  # object-store credentials: referenced by name, never copied into the manifest
        out += [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": k8s.storage_secret, "key": key}}}
            for key, name in k8s.storage_secret_keys.items()
        ]
    out += [{"name": k, "value": v} for k, v in sorted(cfg.train.nccl_env.items())]  # fast interconnect, optional
    return out + [{"name": k, "value": v} for k, v in cuda_env(cfg).items()]


def cuda_env(cfg: DocEVConfig) -> dict[str, str]:
    """On CUDA: expandable allocator segments (less fragmentation as packed and bucketed shapes vary); NCCL's
    init and network lines in the log, so it states the transport it chose (``NET/IB`` with RDMA, ``NET/Socket``
    when it fell back to TCP) unless ``train.nccl_env`` sets NCCL_DEBUG; with ``compile``, Inductor's and
    Triton's caches on the volume, so a restarted pod reuses the kernels instead of recompiling them."""
    if cfg.device != "cuda":
        return {}
    out = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    if "NCCL_DEBUG" not in cfg.train.nccl_env:
        out |= {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
    if cfg.compile:
        cache = PurePosixPath(cfg.kubernetes.mount_path) / "cache"
        out |= {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    return out


def resources(cfg: DocEVConfig) -> dict[str, Any]:
    """Per-node resources; requests = limits: Guaranteed QoS, so a node under memory pressure evicts other
    pods first. ``train.resources.extra`` adds device-plugin resources (e.g. ``rdma/ib``)."""
    res = cfg.train.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory, **res.extra}
    limits: dict[str, str] = dict(requests)
    if res.gpu:
        limits[res.gpu_resource] = str(res.gpu)
    return {"requests": requests, "limits": limits}


def container(cfg: DocEVConfig, name: str, mounts: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The training container: image, mounts and a locked-down security context, plus ``fields``
    (command/env/resources where the job kind puts them on the container). Every capability is dropped;
    ``train.resources.ipc_lock`` adds back IPC_LOCK, which RDMA needs to pin memory."""
    capabilities: dict[str, list[str]] = {"drop": ["ALL"]}
    if cfg.train.resources.ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {
        "name": name,
        "image": cfg.train.image,
        "imagePullPolicy": cfg.train.image_pull_policy,
        **fields,
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": capabilities},
    }


def pod_spec(cfg: DocEVConfig, containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """The pod-level settings of every training pod (both job kinds); add new ones here."""
    k8s = cfg.kubernetes
    spec: dict[str, Any] = {
        # Training pods never call the API server.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": k8s.run_as_user,
            "runAsGroup": k8s.run_as_group,
            "fsGroup": k8s.fs_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": containers,
        "volumes": volumes,
        # SIGTERM -> SIGKILL: time to finish the step in flight and save it (docev.training.preemption)
        "terminationGracePeriodSeconds": cfg.train.termination_grace_seconds,
    }
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    return spec


def preemption_save_seconds(cfg: DocEVConfig) -> tuple[float, int, int] | None:
    """(seconds, bytes per save, writes) of the save a preempted run makes before it exits: this step's write,
    after the async write in flight (if any), at ``train.checkpoint_write_gb_per_second``. None for a
    builder whose size is not known."""
    try:
        arch = arch_of_component(cfg.model.component)
    except ValueError:
        return None
    m = cfg.model
    nbytes = checkpoint_write_bytes(arch, master_dtype=cfg.master_dtype, decoder_trainable=bool(m.decoder_trainable),
                                    encoder_trainable=m.encoder_trainable, fusion_trainable=m.fusion_trainable,
                                    lora=m.lora_args() or None)  # fmt: skip
    writes = 2 if cfg.enable_async_checkpointing else 1
    return writes * nbytes / (cfg.train.checkpoint_write_gb_per_second * 1e9), nbytes, writes


def save_grace_warning(cfg: DocEVConfig) -> str | None:
    """A warning when the preemption save would outlast ``terminationGracePeriodSeconds`` (the kubelet would
    SIGKILL the pods mid-save, and the run resume from the checkpoint before), else None."""
    estimate = preemption_save_seconds(cfg)
    grace = cfg.train.termination_grace_seconds
    if estimate is None or estimate[0] <= grace:
        return None
    seconds, nbytes, writes = estimate
    rate = cfg.train.checkpoint_write_gb_per_second
    writes_text = "the async write in flight, then this step's" if writes == 2 else "one write of this step"
    return (
        f"train.termination_grace_seconds {grace} s (the pods' terminationGracePeriodSeconds) is shorter than the "
        f"preemption save: ~{seconds:.0f} s = {writes} × {nbytes / 1e9:.1f} GB ({writes_text}) at "
        f"train.checkpoint_write_gb_per_second {rate:g} GB/s, before the step in flight finishes; the pods would be "
        f"killed mid-save. Raise train.termination_grace_seconds to at least {math.ceil(seconds)} plus a step, or "
        "set train.checkpoint_write_gb_per_second to the volume's measured write bandwidth"
    )


def cluster_checks(cfg: DocEVConfig, config_path: str) -> None:
    """Config mistakes that only bite on the cluster, reported before a job is created."""
    train, k8s = cfg.train, cfg.kubernetes
    errors = []
    if not config_path.startswith("/"):
        errors.append(f"config path {config_path!r}: must be an absolute path inside the pod (e.g. on the volume)")
    root = PurePosixPath(k8s.mount_path)
    out = PurePosixPath(cfg.work_root)  # an object-store output_dir holds the data; the rest is in work_dir
    if out != root and root not in out.parents:
        key = "output_dir" if cfg.work_dir in (None, cfg.output_dir) else "work_dir"
        errors.append(
            f"{key}: {out} is not below kubernetes.mount_path {root}; the pods would write their outputs "
            "to their own filesystems and lose them"
        )
    gpus = train.resources.gpu
    if cfg.device == "cuda" and gpus == 0:
        errors.append("train.resources.gpu: 0 GPUs per node but device is 'cuda'")
    if gpus and train.nproc_per_node > gpus:
        errors.append(f"train.nproc_per_node: {train.nproc_per_node} ranks per node but only {gpus} GPUs per node")
    if parse_quantity(train.resources.shm_size) > parse_quantity(train.resources.memory):
        errors.append(
            f"train.resources.shm_size: {train.resources.shm_size} exceeds the pod's memory "
            f"{train.resources.memory} (a memory-backed /dev/shm counts against it)"
        )
    if errors:
        raise ConfigError(errors)
