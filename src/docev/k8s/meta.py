"""What every training job kind shares outside the pod: its name, labels, annotations, command and YAML.

Both backends (``pytorchjob``: Training Operator v1 PyTorchJob; ``trainjob``: Kubeflow Trainer v2 TrainJob)
run the same command on every node,

    docev train --config <config on the shared volume> [overrides…] train.backend=local

The trailing ``train.backend=local`` makes the pod train in place instead of launching another job. The
operator (PyTorchJob) or the Trainer's torch plugin (TrainJob) sets ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT`` in each pod; ``torchrun`` reads ``PET_*`` as
the defaults of its options, so the local backend must start ``torchrun`` without overriding them.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple, Required, TypedDict

import yaml

from docev.config import DocEVConfig
from docev.k8s.pod import cluster_checks

# Labels/annotations linking a job (and its pods) to the KFP run that launched it.
RUN_ID_LABEL = "docev-pipelines/kfp-run-id"
TASK_LABEL = "docev-pipelines/kfp-task"
RUN_ID_ANNOTATION = "docev-pipelines/kfp-run-id"
TASK_ANNOTATION = "docev-pipelines/kfp-task"
CONFIG_ANNOTATION = "docev-pipelines/config"
BASE_LABELS = {
    "app.kubernetes.io/name": "docev",
    "app.kubernetes.io/component": "train",
    "app.kubernetes.io/part-of": "docev-pipelines",
}

# Pod, service and host names derived from a job name must stay DNS-1035 labels (63 chars): the operator
# appends "-worker-<i>", JobSet "-node-<job>-<pod>"; job names keep room for that suffix.
MAX_JOB_NAME = 48
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def check_job_name(name: str, kind: str = "PyTorchJob") -> str:
    """A job name: a DNS-1035 label short enough for the pod/service/host names derived from it."""
    if len(name) > MAX_JOB_NAME or not _DNS1035.match(name):
        raise ValueError(
            f"{kind} name {name!r} must be a DNS-1035 label (a-z first, then a-z, 0-9, '-', not ending in '-') "
            f"of at most {MAX_JOB_NAME} chars (pod, service and host names append '-worker-<i>' / '-node-0-<i>')"
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


def job_metadata(config_path: str, run_id: str | None, task: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) of a job and its pods: the app labels plus the KFP run and task that launched it
    (annotations hold them verbatim, labels a label-safe form), and where the pods read their config."""
    labels = dict(BASE_LABELS)
    annotations = {CONFIG_ANNOTATION: config_path}
    if run_id:
        labels[RUN_ID_LABEL] = label_value(run_id)
        annotations[RUN_ID_ANNOTATION] = run_id
    if task:
        labels[TASK_LABEL] = label_value(task)
        annotations[TASK_ANNOTATION] = task
    return labels, annotations


class JobArgs(TypedDict, total=False):
    """The keyword arguments of both renderers. ``name``: the job's; ``config_path``: where the pods read the
    config, whose ``load_config(config_path, overrides)`` must be the ``cfg`` rendered; ``overrides``: put on
    the command; ``run_id``/``task``: the KFP run and task the job and its pods are labelled with."""

    name: Required[str]
    config_path: Required[str]
    overrides: list[str] | tuple[str, ...]
    run_id: str | None
    task: str | None


class Prepared(NamedTuple):
    labels: dict[str, str]
    annotations: dict[str, str]
    command: list[str]


def prepare(cfg: DocEVConfig, kind: str, job: JobArgs) -> Prepared:
    """What every renderer does first: refuse a bad name (ValueError) or settings that cannot work on a
    cluster (ConfigError); then the job's labels, annotations and node command."""
    check_job_name(job["name"], kind)
    cluster_checks(cfg, job["config_path"])
    labels, annotations = job_metadata(job["config_path"], job.get("run_id"), job.get("task"))
    return Prepared(labels, annotations, training_command(job["config_path"], job.get("overrides", ())))


def training_command(config_path: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The container command of every node (see the module docstring for the torchrun contract)."""
    return ["docev", "train", "--config", config_path, *overrides, "train.backend=local"]


class _NoAliasDumper(yaml.SafeDumper):
    """Plain YAML: no ``&id001`` anchors for dicts that appear twice (labels, templates)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(obj: dict[str, Any]) -> str:
    """Deterministic YAML of a rendered object (key order as rendered)."""
    return yaml.dump(obj, Dumper=_NoAliasDumper, sort_keys=False, default_flow_style=False)
