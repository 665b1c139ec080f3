"""Render the training step as a Kubeflow Trainer v2 ``trainer.kubeflow.org/v1alpha1`` TrainJob, and the
``docev-torch-distributed`` ClusterTrainingRuntime it references.

The runtime is Trainer's stock ``torch-distributed`` runtime (one replicated job ``node``, container
``node``, ``mlPolicy.torch``) with the cluster-wide part of ``docev.k8s.pod``: image, /dev/shm, security
context, node selector, tolerations, restart policy and backoff limit, TTL. The TrainJob carries the run:
``trainer.numNodes`` / ``numProcPerNode`` / ``resourcesPerNode``, the command, the env (W&B key from its
Secret), and, as ``runtimePatches``, what the runtime cannot hold: the run's PVC volumes and subPath
mounts, and its labels and annotations. The torch plugin injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``,
``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``; the webhook rejects them in
``trainer.env``, and the command needs nothing else (``docev.k8s.meta``).

Valid for Trainer v2.2 and later (v2.3.0's CRDs are what the tests check): v2.2 renamed
``podTemplateOverrides`` to ``runtimePatches``; a v2.0/v2.1 API server would prune the patches.
"""

from __future__ import annotations

from typing import Any, Unpack

from docev.config import DocEVConfig
from docev.k8s import pod
from docev.k8s.meta import BASE_LABELS, JobArgs, prepare

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
RUNTIME_KIND = "ClusterTrainingRuntime"
RUNTIME_PLURAL = "clustertrainingruntimes"
NODE_JOB = "node"  # the stock runtime's replicated job; the torch plugin injects PET_* into ...
CONTAINER = "node"  # ... its container of this name
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
PATCH_MANAGER = "docev-pipelines"


def render_runtime(cfg: DocEVConfig) -> dict[str, Any]:
    """The ClusterTrainingRuntime ``train.runtime`` as this config wants it (cluster-scoped, no namespace)."""
    node_container = pod.container(cfg, CONTAINER, [pod.SHM_MOUNT])
    pod_spec = {**pod.pod_spec(cfg, [node_container], [pod.shm_volume(cfg)]), "restartPolicy": "OnFailure"}
    policy = cfg.train.run_policy
    jobset: dict[str, Any] = {}
    if policy.ttl_seconds_after_finished is not None:
        jobset["ttlSecondsAfterFinished"] = policy.ttl_seconds_after_finished
    jobset["replicatedJobs"] = [
        {
            "name": NODE_JOB,
            "template": {
                "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                "spec": {
                    # Container restarts (restartPolicy OnFailure) of a node before the TrainJob fails.
                    "backoffLimit": policy.backoff_limit,
                    "template": {"metadata": {"annotations": dict(pod.POD_ANNOTATIONS)}, "spec": pod_spec},
                },
            },
        }
    ]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": RUNTIME_KIND,
        "metadata": {"name": cfg.train.runtime, "labels": {"trainer.kubeflow.org/framework": "torch", **BASE_LABELS}},
        "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": jobset}},
    }


def render_trainjob(cfg: DocEVConfig, **job: Unpack[JobArgs]) -> dict[str, Any]:
    """The TrainJob for ``cfg`` as a plain dict (ready for the API or YAML); same contract as
    ``render_pytorchjob``."""
    labels, annotations, command = prepare(cfg, KIND, job)
    train, k8s = cfg.train, cfg.kubernetes
    node_pod = {
        "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
        "spec": {
            "volumes": pod.pvc_volumes(cfg),
            "containers": [{"name": CONTAINER, "volumeMounts": pod.pvc_mounts(cfg)}],
        },
    }
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": NODE_JOB,
                            "template": {"metadata": {"labels": dict(labels)}, "spec": {"template": node_pod}},
                        }
                    ]
                },
            }
        },
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job["name"], "namespace": k8s.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": train.runtime},
            "activeDeadlineSeconds": train.timeout_seconds,
            "trainer": {
                "image": train.image,
                "command": command,
                "numNodes": train.nnodes,
                "numProcPerNode": train.nproc_per_node,
                "resourcesPerNode": pod.resources(cfg),
                "env": pod.env(cfg),  # never PET_*: the plugin owns them
            },
            "runtimePatches": [patch],
        },
    }


def runtime_drift(expected: Any, live: Any, path: str = "spec") -> list[str]:
    """Where the live runtime differs from ``render_runtime(cfg)``: every field the config sets is compared
    (dicts by the expected keys, so fields the API server adds do not count; lists element by element)."""
    if isinstance(expected, dict) and isinstance(live, dict):
        return [d for key, value in expected.items() for d in runtime_drift(value, live.get(key), f"{path}.{key}")]
    if isinstance(expected, list) and isinstance(live, list) and len(expected) == len(live):
        return [
            d for i, (e, v) in enumerate(zip(expected, live, strict=True)) for d in runtime_drift(e, v, f"{path}[{i}]")
        ]
    return [] if expected == live else [f"{path}: runtime has {live!r}, the config wants {expected!r}"]


def node_pod_spec(runtime: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a runtime's ``node`` job (the dict itself, not a copy)."""
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    node = next(j for j in jobs if j["name"] == NODE_JOB)
    return node["template"]["spec"]["template"]["spec"]
