"""The job kinds the launcher follows (``JobKind``), keyed by ``train.backend``, and the TrainJob's runtime check."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from docev.config import DocEVConfig
from docev.k8s import pytorchjob, trainjob


class LaunchError(RuntimeError):
    """The job could not be created or adopted."""


@dataclass(frozen=True)
class JobKind:
    """How the launcher creates, finds, reads and judges one kind of training job. ``module`` is the kind's
    renderer (``GROUP``, ``VERSION``, ``PLURAL``, ``KIND``, ``CONTAINER``: its training container)."""

    module: ModuleType
    render: Callable[..., dict[str, Any]]
    job_label: str  # the label the controller puts on every pod of the job (value: the job name)
    first_node: str  # the extra label selector of the first node's pod (the one whose log is streamed)
    succeeded: str  # the condition type of success ("Failed" is the failure type of both)
    preflight: Callable[[client.CustomObjectsApi, DocEVConfig], None] | None = None

    @property
    def kind(self) -> str:
        return self.module.KIND

    @property
    def container(self) -> str:
        return self.module.CONTAINER

    @property
    def resource(self) -> tuple[str, str, str]:
        """(group, version, plural) of the namespaced API calls."""
        return self.module.GROUP, self.module.VERSION, self.module.PLURAL


def _check_runtime(api: client.CustomObjectsApi, cfg: DocEVConfig) -> None:
    """The TrainJob's ClusterTrainingRuntime exists and holds what the config says (everything but the image,
    which the TrainJob sets): a stale or foreign runtime would run the pods with other settings."""
    name = cfg.train.runtime
    try:
        live = api.get_cluster_custom_object(trainjob.GROUP, trainjob.VERSION, trainjob.RUNTIME_PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            raise LaunchError(
                f"ClusterTrainingRuntime {name!r} (train.runtime) not found: apply manifests/runtimes/<overlay> "
                "or set train.runtime to an existing one"
            ) from exc
        raise LaunchError(f"reading ClusterTrainingRuntime {name!r}: HTTP {exc.status} {api_message(exc)}") from exc
    expected = trainjob.render_runtime(cfg)
    trainjob.node_pod_spec(expected)["containers"][0].pop("image")
    drift = trainjob.runtime_drift(expected["spec"], live.get("spec") or {})
    if drift:
        raise LaunchError(
            f"ClusterTrainingRuntime {name!r} does not match the config; apply the one "
            "`docev render-manifests --backend trainjob --runtime-out DIR` writes, or set train.runtime:\n  "
            + "\n  ".join(drift)
        )


PYTORCHJOB = JobKind(
    pytorchjob,
    pytorchjob.render_pytorchjob,
    job_label="training.kubeflow.org/job-name",
    first_node="training.kubeflow.org/replica-type=master",
    succeeded="Succeeded",
)
# Trainer runs a TrainJob as a JobSet of the same name: pods carry JobSet's labels, node 0 is completion index 0.
TRAINJOB = JobKind(
    trainjob,
    trainjob.render_trainjob,
    job_label="jobset.sigs.k8s.io/jobset-name",
    first_node=f"jobset.sigs.k8s.io/replicatedjob-name={trainjob.NODE_JOB},batch.kubernetes.io/job-completion-index=0",
    succeeded="Complete",
    preflight=_check_runtime,
)
KINDS = {"kubernetes": PYTORCHJOB, "trainjob": TRAINJOB}  # by train.backend


def api_message(exc: ApiException) -> str:
    """The ``message`` of a Kubernetes Status body, else the reason phrase."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)
