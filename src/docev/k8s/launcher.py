"""The train step's ``kubernetes`` backend: run the PyTorchJob, stream its master's log, and fail loudly.

``launch_pytorchjob`` creates the job under a name derived from the KFP run id and task, so a retried
launcher pod adopts the job it started before instead of starting a second one. It then waits, printing
the master pod's log as it comes, until the job succeeds (returns), fails (raises ``PyTorchJobFailed``
with the operator's reason and the last log lines of the pod that failed first), or outlives the wait
timeout (deletes the job, raises ``PyTorchJobTimeout``). The widely copied ``pytorch-launcher`` reports
success whatever the job did; a KFP step wrapping this function fails exactly when training fails.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from docev.config import DocEVConfig
from docev.k8s.pytorchjob import (
    CONTAINER,
    GROUP,
    PLURAL,
    RUN_ID_ANNOTATION,
    TASK_ANNOTATION,
    VERSION,
    job_name,
    render_pytorchjob,
)

# Labels the Training Operator puts on the pods of a job (replica types lower-cased).
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
# The operator enforces activeDeadlineSeconds (= train.timeout_seconds); the launcher waits this much longer
# so the operator's own reason reaches the step, and only gives up itself when the operator does not act.
DEADLINE_GRACE_SECONDS = 600

Log = Callable[[str], None]


class LaunchError(RuntimeError):
    """The job could not be created or adopted."""


@dataclass
class PyTorchJobFailed(RuntimeError):
    """The job failed. ``str()`` is the whole report: condition, failing pod, its last log lines."""

    job: str
    reason: str
    message: str
    pod: str | None = None
    log_tail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"PyTorchJob {self.job} failed: {self.reason}: {self.message}"]
        if self.pod:
            lines.append(f"failing pod: {self.pod}")
        if self.log_tail:
            lines.append(f"last {len(self.log_tail)} log lines:")
            lines += [f"  {line}" for line in self.log_tail]
        else:
            lines.append("no pod log available")
        return "\n".join(lines)


class PyTorchJobTimeout(PyTorchJobFailed):
    """The job did not finish within the wait timeout; the launcher deleted it."""


@dataclass(frozen=True)
class LaunchResult:
    name: str
    namespace: str
    adopted: bool  # the job existed already (a retried launcher)
    deleted: bool  # removed after success (train.delete_job_on_success)
    message: str  # the operator's Succeeded condition message


def api_client_from_environment() -> client.ApiClient:
    """In-cluster credentials inside a pod (the launcher's service account), else the local kubeconfig."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def job_state(job: dict[str, Any]) -> tuple[str, str, str]:
    """(condition type, reason, message) of the job now: a True Failed/Succeeded wins, else the last True
    condition the operator added; ("Pending", "", "") before the operator has seen the job."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for terminal in ("Failed", "Succeeded"):
        for c in conditions:
            if c.get("type") == terminal:
                return terminal, c.get("reason", ""), c.get("message", "")
    if not conditions:
        return "Pending", "", ""
    last = conditions[-1]
    return last.get("type", ""), last.get("reason", ""), last.get("message", "")


def launch_pytorchjob(
    cfg: DocEVConfig,
    *,
    config_path: str,
    run_id: str,
    task: str,
    overrides: list[str] | tuple[str, ...] = (),
    api_client: client.ApiClient | None = None,
    wait_timeout_seconds: float | None = None,
    log: Log = print,
) -> LaunchResult:
    """Create (or adopt) the training PyTorchJob of ``task`` in KFP run ``run_id`` and wait for it.

    ``cfg`` is ``load_config(<file at config_path>, overrides)``; ``config_path`` is where the pods read
    that file (on the shared volume). The wait timeout defaults to ``train.timeout_seconds`` plus
    ``DEADLINE_GRACE_SECONDS``. Raises PyTorchJobFailed / PyTorchJobTimeout / LaunchError.
    """
    api_client = api_client or api_client_from_environment()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    namespace = cfg.kubernetes.namespace
    name = job_name(run_id, task)
    body = render_pytorchjob(cfg, name=name, config_path=config_path, overrides=overrides, run_id=run_id, task=task)
    jobs = _Jobs(custom, namespace, cfg.train.poll_seconds, log)
    adopted = jobs.create_or_adopt(body, run_id, task)
    timeout = wait_timeout_seconds
    if timeout is None:
        timeout = cfg.train.timeout_seconds + DEADLINE_GRACE_SECONDS

    follower = _LogFollower(core, namespace, name, cfg.train.poll_seconds, log)
    follower.start()
    try:
        job = jobs.wait(name, timeout)
        if job is not None:
            follower.drain()  # the master has exited: copy the rest of its log
    finally:
        follower.stop()
    pods = _Pods(core, namespace, name, cfg.train.failure_log_lines)
    if job is None:
        pod, tail = pods.master_tail()
        jobs.delete(name)
        raise PyTorchJobTimeout(
            job=f"{namespace}/{name}",
            reason="Timeout",
            message=f"not finished after {timeout:g} s; the launcher deleted the job",
            pod=pod,
            log_tail=tail,
        )
    state, reason, message = job_state(job)
    if state == "Failed":
        pod, tail = pods.failure_tail()
        raise PyTorchJobFailed(job=f"{namespace}/{name}", reason=reason, message=message, pod=pod, log_tail=tail)
    deleted = False
    if cfg.train.delete_job_on_success:
        jobs.delete(name)
        deleted = True
    log(f"[launcher] PyTorchJob {namespace}/{name} succeeded{' (deleted)' if deleted else ''}: {message}")
    return LaunchResult(name=name, namespace=namespace, adopted=adopted, deleted=deleted, message=message)


class _Jobs:
    """PyTorchJob calls of the launcher (CustomObjectsApi)."""

    def __init__(self, api: client.CustomObjectsApi, namespace: str, poll: float, log: Log):
        self.api, self.namespace, self.poll, self.log = api, namespace, poll, log

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        """Delete the job; Foreground so its pods are gone before the name is free again."""
        try:
            self.api.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_or_adopt(self, body: dict[str, Any], run_id: str, task: str) -> bool:
        """Create the job; on 409 adopt the existing one if it belongs to the same run and task. A failed
        job is replaced (a KFP retry of the step should train again, resuming from ``latest``). Returns
        whether a running or finished job was adopted."""
        name = body["metadata"]["name"]
        where = f"{self.namespace}/{name}"
        for _ in range(3):
            try:
                self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
                self.log(f"[launcher] created PyTorchJob {where}")
                return False
            except ApiException as exc:
                if exc.status != 409:
                    raise LaunchError(f"creating PyTorchJob {where}: HTTP {exc.status} {_api_message(exc)}") from exc
            existing = self.get(name)
            if existing is None:
                continue  # deleted between our create and get: create again
            annotations = existing.get("metadata", {}).get("annotations") or {}
            owner = (annotations.get(RUN_ID_ANNOTATION), annotations.get(TASK_ANNOTATION))
            if owner != (run_id, task):
                raise LaunchError(
                    f"PyTorchJob {where} exists but was not launched by run {run_id!r} task {task!r} "
                    f"(its annotations say run {owner[0]!r} task {owner[1]!r}); refusing to adopt it"
                )
            state, reason, message = job_state(existing)
            deleting = bool(existing.get("metadata", {}).get("deletionTimestamp"))
            if state != "Failed" and not deleting:
                self.log(f"[launcher] adopted existing PyTorchJob {where} ({state})")
                return True
            why = "being deleted" if deleting else f"{reason}: {message}"
            self.log(f"[launcher] replacing PyTorchJob {where} ({why})")
            if not deleting:
                self.delete(name)
            self._wait_gone(name)
        raise LaunchError(f"PyTorchJob {where}: could not create or adopt it after 3 attempts")

    def _wait_gone(self, name: str, limit: float = 600) -> None:
        end = time.monotonic() + limit
        while self.get(name) is not None:
            if time.monotonic() > end:
                raise LaunchError(f"PyTorchJob {self.namespace}/{name} still exists {limit:g} s after deletion")
            time.sleep(self.poll)

    def wait(self, name: str, timeout: float) -> dict[str, Any] | None:
        """Poll until the job succeeds or fails (returns it) or ``timeout`` passes (returns None)."""
        end = time.monotonic() + timeout
        last = None
        while True:
            job = self.get(name)
            if job is None:
                raise LaunchError(f"PyTorchJob {self.namespace}/{name} was deleted while the launcher waited for it")
            state, reason, message = job_state(job)
            if (state, reason) != last:
                detail = f" ({message})" if message else ""
                self.log(f"[launcher] PyTorchJob {self.namespace}/{name}: {state}{detail}")
                last = (state, reason)
            if state in ("Succeeded", "Failed"):
                return job
            if time.monotonic() >= end:
                return None
            time.sleep(min(self.poll, max(0.0, end - time.monotonic())))


def _api_message(exc: ApiException) -> str:
    """The ``message`` of a Kubernetes Status body, else the reason phrase."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except ValueError:
        return str(exc.reason)


def _container_status(pod: client.V1Pod) -> client.V1ContainerStatus | None:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return next((s for s in statuses if s.name == CONTAINER), None)


class _Pods:
    """Reading the job's pods and logs after it ended (CoreV1Api)."""

    def __init__(self, api: client.CoreV1Api, namespace: str, job: str, lines: int):
        self.api, self.namespace, self.job, self.lines = api, namespace, job, lines

    def list(self, replica_type: str | None = None) -> list[client.V1Pod]:
        selector = f"{JOB_NAME_LABEL}={self.job}"
        if replica_type:
            selector += f",{REPLICA_TYPE_LABEL}={replica_type}"
        return self.api.list_namespaced_pod(self.namespace, label_selector=selector).items

    def tail(self, pod: str, previous: bool = False) -> list[str]:
        try:
            text = self.api.read_namespaced_pod_log(
                pod, self.namespace, container=CONTAINER, tail_lines=self.lines, previous=previous
            )
        except ApiException:
            return []
        return text.splitlines()[-self.lines :]

    def failure_tail(self) -> tuple[str | None, list[str]]:
        """The pod whose ``pytorch`` container exited non-zero first (the others usually die of the
        collective it left), with the last log lines of that run of the container."""
        failed = []
        for pod in self.list():
            status = _container_status(pod)
            if status is None:
                continue
            for previous, state in ((False, status.state), (True, status.last_state)):
                term = state.terminated if state else None
                if term is not None and term.exit_code:
                    when = term.finished_at.timestamp() if term.finished_at else float("inf")
                    failed.append((when, pod.metadata.name, previous, term))
                    break
        if not failed:
            return self.master_tail()
        _, pod, previous, term = min(failed, key=lambda f: (f[0], f[1]))
        why = f"container {CONTAINER} exited {term.exit_code}" + (f" ({term.reason})" if term.reason else "")
        return f"{pod}: {why}", self.tail(pod, previous)

    def master_tail(self) -> tuple[str | None, list[str]]:
        pods = self.list("master")
        if not pods:
            return None, []
        return pods[0].metadata.name, self.tail(pods[0].metadata.name)


class _LogFollower(threading.Thread):
    """Copies the master pod's ``pytorch`` log to ``log`` as it is written. Each container run (pod uid,
    restart count) is followed once to its end; a dropped stream is re-followed, skipping lines already
    copied, and a restarted container is followed from its start."""

    def __init__(self, api: client.CoreV1Api, namespace: str, job: str, poll: float, log: Log):
        super().__init__(name=f"logs-{job}", daemon=True)
        self.pods = _Pods(api, namespace, job, 0)
        self.api, self.namespace, self.poll, self.log = api, namespace, poll, log
        self._stop_event = threading.Event()
        self._drain_event = threading.Event()
        self._response: Any = None
        self.copied: dict[tuple[str, int], int] = {}
        self._finished: set[tuple[str, int]] = set()
        self._waiting: str | None = None
        self._problem: str | None = None

    def drain(self, timeout: float = 60) -> None:
        """Make one last pass over the master's log (the job has ended), then return."""
        self._drain_event.set()
        self.join(timeout)

    def stop(self, timeout: float = 10) -> None:
        """End now, closing a stream in progress."""
        self._stop_event.set()
        self._drain_event.set()
        response = self._response
        if response is not None:
            response.close()
        self.join(timeout)

    def run(self) -> None:
        while not self._stop_event.is_set():
            last_pass = self._drain_event.is_set()
            try:
                self._follow_once()
            except Exception as exc:  # a log hiccup must not end the wait for the job
                problem = f"[launcher] cannot read the master's log: {str(exc).strip().splitlines()[0]}"
                if problem != self._problem:  # once per distinct problem, not every poll
                    self.log(problem)
                    self._problem = problem
            if last_pass:
                return
            self._drain_event.wait(self.poll)

    def _follow_once(self) -> None:
        pods = self.pods.list("master")
        if not pods:
            return
        pod = pods[0]
        status = _container_status(pod)
        if status is None or status.state is None or status.state.waiting is not None:
            self._report_waiting(pod, status)
            return
        key = (pod.metadata.uid or pod.metadata.name, status.restart_count or 0)
        if key in self._finished:
            return
        ended = status.state.terminated is not None
        self._response = self.api.read_namespaced_pod_log(
            pod.metadata.name, self.namespace, container=CONTAINER, follow=True, _preload_content=False
        )
        try:
            self._copy(key, self._response)
        finally:
            self._response.release_conn()
            self._response = None
        if ended:
            self._finished.add(key)

    def _report_waiting(self, pod: client.V1Pod, status: client.V1ContainerStatus | None) -> None:
        waiting = status.state.waiting if status is not None and status.state is not None else None
        text = f"{waiting.reason}: {waiting.message or ''}".rstrip(": ") if waiting else (pod.status.phase or "")
        if text and text != self._waiting:
            self.log(f"[launcher] pod {pod.metadata.name} waiting: {text}")
            self._waiting = text

    def _copy(self, key: tuple[str, int], response: Any) -> None:
        done = self.copied.get(key, 0)
        count, pending = 0, b""
        for chunk in response.stream(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                count += 1
                if count > done:
                    self.log(line.decode("utf-8", "replace"))
                    self.copied[key] = count
            if self._stop_event.is_set():
                return
        if pending:
            count += 1
            if count > done:
                self.log(pending.decode("utf-8", "replace"))
                self.copied[key] = count
