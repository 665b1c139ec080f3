"""Render the training step as a Kubeflow Training Operator ``kubeflow.org/v1`` PyTorchJob.

One config gives one job: a Master (1 pod) plus ``train.nnodes - 1`` Workers, each running
``train.nproc_per_node`` ranks. Every pod runs ``training_command`` (see ``docev.k8s.meta`` for the
torchrun contract); the pod itself is ``docev.k8s.pod``'s, shared with the TrainJob backend.
"""

from __future__ import annotations

import copy
from typing import Any, Unpack

from docev.config import DocEVConfig
from docev.k8s import pod
from docev.k8s.meta import JobArgs, prepare

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
CONTAINER = "pytorch"  # the operator finds the training container by this name


def _pod_template(cfg: DocEVConfig, labels: dict[str, str], command: list[str]) -> dict[str, Any]:
    container = pod.container(
        cfg,
        CONTAINER,
        [*pod.pvc_mounts(cfg), pod.SHM_MOUNT],
        command=command,
        env=pod.env(cfg),
        resources=pod.resources(cfg),
    )
    spec = pod.pod_spec(cfg, [container], [*pod.pvc_volumes(cfg), pod.shm_volume(cfg)])
    return {"metadata": {"labels": dict(labels), "annotations": dict(pod.POD_ANNOTATIONS)}, "spec": spec}


def render_pytorchjob(cfg: DocEVConfig, **job: Unpack[JobArgs]) -> dict[str, Any]:
    """The PyTorchJob for ``cfg`` as a plain dict (ready for the API or YAML); ``job``: see ``JobArgs``.
    Raises ConfigError for settings that cannot work on a cluster, ValueError for a bad name."""
    labels, annotations, command = prepare(cfg, KIND, job)
    train, k8s = cfg.train, cfg.kubernetes
    template = _pod_template(cfg, labels, command)
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
        "metadata": {"name": job["name"], "namespace": k8s.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "nprocPerNode": str(train.nproc_per_node),
            "pytorchReplicaSpecs": replicas,
            "runPolicy": run_policy,
        },
    }
