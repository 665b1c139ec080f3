"""Render the training step as a Kubeflow Training Operator ``kubeflow.org/v1`` PyTorchJob.

One config gives one job: a Master (1 pod) plus ``train.nnodes - 1`` Workers, each running
``train.nproc_per_node`` ranks. Every pod runs the same command,

    docev train --config <config on the shared volume> [overrides…] train.backend=local

The trailing ``train.backend=local`` makes the pod train in place instead of launching another job.
The operator sets ``PET_NNODES``, ``PET_NPROC_PER_NODE`` (from ``nprocPerNode``), ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in each pod; ``torchrun`` reads ``PET_*`` as the defaults
of its options, so the local backend must start ``torchrun`` without overriding them.
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import PurePosixPath
from typing import Any, NamedTuple

import yaml

from docev.config import ConfigError, DocEVConfig

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container by this name

# Labels/annotations linking a job (and its pods) to the KFP run that launched it.
RUN_ID_LABEL = "docev-pipelines/kfp-run-id"
TASK_LABEL = "docev-pipelines/kfp-task"
RUN_ID_ANNOTATION = "docev-pipelines/kfp-run-id"
TASK_ANNOTATION = "docev-pipelines/kfp-task"
CONFIG_ANNOTATION = "docev-pipelines/config"

# The operator names pods and services "<job>-worker-<index>", which must stay DNS-1035 labels (63
# chars), so job names keep room for that suffix.
MAX_JOB_NAME = 48
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_SHM_VOLUME = "dshm"


class VolumeMount(NamedTuple):
    """A PVC mounted into the training pods (``sub_path`` "" mounts the claim's root)."""

    volume: str
    claim: str
    mount_path: str
    sub_path: str


def check_job_name(name: str) -> str:
    """A PyTorchJob name: a DNS-1035 label short enough for the pod/service names derived from it."""
    if len(name) > MAX_JOB_NAME or not _DNS1035.match(name):
        raise ValueError(
            f"PyTorchJob name {name!r} must be a DNS-1035 label (a-z first, then a-z, 0-9, '-', not ending in '-') "
            f"of at most {MAX_JOB_NAME} chars (the operator appends '-worker-<i>' for pod and service names)"
        )
    return name


def job_name(run_id: str, task: str, prefix: str = "docev") -> str:
    """Deterministic job name for one task of one KFP run: a retried launcher gets the same name and adopts
    the job instead of starting a second one. The digest keeps names of different runs apart after the
    readable part is truncated."""
    if not run_id or not task:
        raise ValueError("job_name needs a non-empty KFP run id and task name")
    digest = hashlib.sha256(f"{run_id}\0{task}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")
    room = MAX_JOB_NAME - len(prefix) - len(digest) - 2
    parts = [prefix, readable[:room].rstrip("-"), digest]
    return check_job_name("-".join(p for p in parts if p))


def label_value(text: str) -> str:
    """Fit free text into a label value (63 chars of [A-Za-z0-9._-], alphanumeric at both ends)."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def training_command(config_path: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The container command of every replica (see the module docstring for the torchrun contract)."""
    return ["docev", "train", "--config", config_path, *overrides, "train.backend=local"]


def checkpoint_dir(cfg: DocEVConfig) -> str:
    """Where training writes checkpoints (DESIGN §7: ``<output_dir>/checkpoints`` unless the checkpointer says)."""
    return cfg.checkpointer.output_dir or f"{cfg.output_dir.rstrip('/')}/checkpoints"


def volume_mounts(cfg: DocEVConfig) -> list[VolumeMount]:
    """The PVC mounts of the training pods. The checkpoint volume is mounted over the checkpoint folder with
    a subPath equal to that folder's path on the data volume, so paths are the same with or without it
    and runs with different output dirs do not share checkpoint folders. Other pods that read checkpoints
    (export) must mount the same way (``kfp.kubernetes.mount_pvc(..., sub_path=...)``)."""
    k8s = cfg.kubernetes
    mounts = [VolumeMount("data", k8s.pvc, k8s.mount_path, "")]
    if k8s.checkpoint_pvc:
        ckpt = PurePosixPath(checkpoint_dir(cfg))
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


def _cluster_checks(cfg: DocEVConfig, config_path: str) -> None:
    """Config mistakes that only bite on the cluster, reported before a job is created."""
    from kubernetes.utils import parse_quantity

    train, k8s = cfg.train, cfg.kubernetes
    errors = []
    if not config_path.startswith("/"):
        errors.append(f"config path {config_path!r}: must be an absolute path inside the pod (e.g. on the volume)")
    root = PurePosixPath(k8s.mount_path)
    out = PurePosixPath(cfg.output_dir)
    if out != root and root not in out.parents:
        errors.append(
            f"output_dir: {out} is not below kubernetes.mount_path {root}; the pods would write their outputs "
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


def _container(cfg: DocEVConfig, config_path: str, overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    train, k8s, res = cfg.train, cfg.kubernetes, cfg.train.resources
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    if k8s.wandb_secret:
        env.append(
            {
                "name": "WANDB_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": k8s.wandb_secret, "key": k8s.wandb_secret_key}},
            }
        )
    env += [{"name": k, "value": v} for k, v in sorted(train.nccl_env.items())]
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory, **res.extra}
    limits: dict[str, str] = dict(requests)
    if res.gpu:
        limits[res.gpu_resource] = str(res.gpu)
    capabilities: dict[str, list[str]] = {"drop": ["ALL"], **({"add": ["IPC_LOCK"]} if res.ipc_lock else {})}
    mounts = [
        {"name": m.volume, "mountPath": m.mount_path, **({"subPath": m.sub_path} if m.sub_path else {})}
        for m in volume_mounts(cfg)
    ]
    mounts.append({"name": _SHM_VOLUME, "mountPath": "/dev/shm"})
    return {
        "name": CONTAINER,
        "image": train.image,
        "imagePullPolicy": train.image_pull_policy,
        "command": training_command(config_path, overrides),
        "env": env,
        # requests = limits: Guaranteed QoS, so a node under memory pressure evicts other pods first.
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": capabilities},
    }


def _pod_template(
    cfg: DocEVConfig, labels: dict[str, str], config_path: str, overrides: list[str] | tuple[str, ...]
) -> dict[str, Any]:
    k8s = cfg.kubernetes
    volumes: list[dict[str, Any]] = [
        {"name": m.volume, "persistentVolumeClaim": {"claimName": m.claim}} for m in volume_mounts(cfg)
    ]
    volumes.append({"name": _SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.train.resources.shm_size}})
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
        "containers": [_container(cfg, config_path, overrides)],
        "volumes": volumes,
    }
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in k8s.tolerations]
    # An Istio sidecar keeps a finished pod running and breaks torchrun's rendezvous.
    metadata = {"labels": dict(labels), "annotations": {"sidecar.istio.io/inject": "false"}}
    return {"metadata": metadata, "spec": spec}


def render_pytorchjob(
    cfg: DocEVConfig,
    *,
    name: str,
    config_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    run_id: str | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """The PyTorchJob for ``cfg`` as a plain dict (ready for the API or YAML).

    ``cfg`` must be the config the pods will see: ``load_config(<the file at config_path>, overrides)``.
    ``run_id``/``task`` label the job and its pods with the KFP run that launched them. Raises ConfigError
    for settings that cannot work on a cluster, ValueError for a bad name.
    """
    check_job_name(name)
    _cluster_checks(cfg, config_path)
    train, k8s = cfg.train, cfg.kubernetes
    labels = {
        "app.kubernetes.io/name": "docev",
        "app.kubernetes.io/component": "train",
        "app.kubernetes.io/part-of": "docev-pipelines",
    }
    annotations = {CONFIG_ANNOTATION: config_path}
    if run_id:
        labels[RUN_ID_LABEL] = label_value(run_id)
        annotations[RUN_ID_ANNOTATION] = run_id
    if task:
        labels[TASK_LABEL] = label_value(task)
        annotations[TASK_ANNOTATION] = task
    template = _pod_template(cfg, labels, config_path, overrides)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if train.nnodes > 1:
        replicas["Worker"] = {
            "replicas": train.nnodes - 1,
            "restartPolicy": "OnFailure",
            "template": copy.deepcopy(template),
        }
    policy = train.run_policy
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": policy.clean_pod_policy,
        "backoffLimit": policy.backoff_limit,
        "activeDeadlineSeconds": train.timeout_seconds,
    }
    if policy.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": k8s.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "nprocPerNode": str(train.nproc_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": run_policy,
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Plain YAML: no ``&id001`` anchors for dicts that appear twice (labels, templates)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    """Deterministic YAML of a rendered object (key order as rendered)."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)
