"""The train step's cluster backends: run the training job, stream its first node's log, and fail loudly.

One code path for both job kinds (``JobKind``): the Training Operator's PyTorchJob (``train.backend:
kubernetes``) and Kubeflow Trainer's TrainJob (``train.backend: trainjob``). ``launch_job`` creates the job
under a name derived from the KFP run id and task, so a retried launcher pod adopts the job it started
before instead of starting a second one. It then waits, printing the first node's log (the PyTorchJob's
master, the TrainJob's node 0) as it comes, until the job succeeds (returns), fails (raises ``JobFailed``
with the controller's reason and the last log lines of the pod that failed first), or outlives the wait
timeout (deletes the job, raises ``JobTimeout``). The widely copied ``pytorch-launcher`` reports success
whatever the job did; a KFP step wrapping this function fails exactly when training fails. A TrainJob is
only created once its ClusterTrainingRuntime exists and matches the config (``runtime_drift``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from docev.config import ConfigError, DocEVConfig
from docev.k8s.kinds import KINDS, JobKind, LaunchError, api_message
from docev.k8s.meta import RUN_ID_ANNOTATION, TASK_ANNOTATION, job_name
from docev.k8s.pod import save_grace_warning

# The controller enforces activeDeadlineSeconds (= train.timeout_seconds); the launcher waits this much longer
# so the controller's own reason reaches the step, and only gives up itself when the controller does not act.
DEADLINE_GRACE_SECONDS = 600

Log = Callable[[str], None]


@dataclass
class JobFailed(RuntimeError):
    """The job failed. ``str()`` is the whole report: condition, failing pod, its last log lines."""

    kind: str
    job: str
    reason: str
    message: str
    pod: str | None = None
    log_tail: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.kind} {self.job} failed: {self.reason}: {self.message}"]
        if self.pod:
            lines.append(f"failing pod: {self.pod}")
        if self.log_tail:
            lines.append(f"last {len(self.log_tail)} log lines:")
            lines += [f"  {line}" for line in self.log_tail]
        else:
            lines.append("no pod log available")
        return "\n".join(lines)


class JobTimeout(JobFailed):
    """The job did not finish within the wait timeout; the launcher deleted it."""


@dataclass(frozen=True)
class LaunchResult:
    name: str
    namespace: str
    adopted: bool  # the job existed already (a retried launcher)
    deleted: bool  # removed after success (train.delete_job_on_success)
    message: str  # the controller's success condition message


def api_client_from_environment() -> client.ApiClient:
    """In-cluster credentials inside a pod (the launcher's service account), else the local kubeconfig."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


def job_state(job: dict[str, Any], succeeded: str = "Succeeded") -> tuple[str, str, str]:
    """(condition type, reason, message) of the job now: a True Failed/``succeeded`` wins, else the last True
    condition the controller added; ("Pending", "", "") before the controller has seen the job."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for terminal in ("Failed", succeeded):
        for c in conditions:
            if c.get("type") == terminal:
                return terminal, c.get("reason", ""), c.get("message", "")
    if not conditions:
        return "Pending", "", ""
    last = conditions[-1]
    return last.get("type", ""), last.get("reason", ""), last.get("message", "")


def launch_job(
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
    """Create (or adopt) the training job (kind by ``train.backend``) of ``task`` in KFP run ``run_id`` and
    wait for it.

    ``cfg`` is ``load_config(<file at config_path>, overrides)``; ``config_path`` is where the pods read
    that file (on the shared volume). The wait timeout defaults to ``train.timeout_seconds`` plus
    ``DEADLINE_GRACE_SECONDS``. Raises JobFailed / JobTimeout / LaunchError.
    """
    if cfg.train.backend not in KINDS:
        raise ConfigError(
            [f"train.backend: {cfg.train.backend!r} trains in place; the launcher needs one of {list(KINDS)}"]
        )
    kind = KINDS[cfg.train.backend]
    api_client = api_client or api_client_from_environment()
    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)
    namespace = cfg.kubernetes.namespace
    name = job_name(run_id, task)
    body = kind.render(cfg, name=name, config_path=config_path, overrides=overrides, run_id=run_id, task=task)
    warning = save_grace_warning(cfg)
    if warning:
        log(f"[launcher] warning: {warning}")
    if kind.preflight is not None:
        kind.preflight(custom, cfg)
    jobs = _Jobs(custom, kind, namespace, cfg.train.poll_seconds, log)
    adopted = jobs.create_or_adopt(body, run_id, task)
    timeout = wait_timeout_seconds
    if timeout is None:
        timeout = cfg.train.timeout_seconds + DEADLINE_GRACE_SECONDS

    follower = _LogFollower(core, kind, namespace, name, cfg.train.poll_seconds, log)
    follower.start()
    try:
        job = jobs.wait(name, timeout)
        if job is not None:
            follower.drain()  # the first node has exited: copy the rest of its log
    finally:
        follower.stop()
    pods = _Pods(core, kind, namespace, name, cfg.train.failure_log_lines)
    where = f"{namespace}/{name}"
    if job is None:
        pod, tail = pods.first_tail()
        jobs.delete(name)
        raise JobTimeout(
            kind=kind.kind,
            job=where,
            reason="Timeout",
            message=f"not finished after {timeout:g} s; the launcher deleted the job",
            pod=pod,
            log_tail=tail,
        )
    state, reason, message = job_state(job, kind.succeeded)
    if state == "Failed":
        pod, tail = pods.failure_tail()
        raise JobFailed(kind=kind.kind, job=where, reason=reason, message=message, pod=pod, log_tail=tail)
    deleted = False
    if cfg.train.delete_job_on_success:
        jobs.delete(name)
        deleted = True
    log(f"[launcher] {kind.kind} {where} succeeded{' (deleted)' if deleted else ''}: {message}")
    return LaunchResult(name=name, namespace=namespace, adopted=adopted, deleted=deleted, message=message)


class _Jobs:
    """Job calls of the launcher (CustomObjectsApi), for one job kind."""

    def __init__(self, api: client.CustomObjectsApi, kind: JobKind, namespace: str, poll: float, log: Log):
        self.api, self.kind, self.namespace, self.poll, self.log = api, kind, namespace, poll, log
        group, version, plural = kind.resource
        self.resource = (group, version, namespace, plural)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            return self.api.get_namespaced_custom_object(*self.resource, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, name: str) -> None:
        """Delete the job; Foreground so its pods are gone before the name is free again."""
        try:
            self.api.delete_namespaced_custom_object(*self.resource, name, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def create_or_adopt(self, body: dict[str, Any], run_id: str, task: str) -> bool:
        """Create the job; on 409 adopt the existing one if it belongs to the same run and task. A failed
        job is replaced (a KFP retry of the step should train again, resuming from ``latest``). Returns
        whether a running or finished job was adopted."""
        name = body["metadata"]["name"]
        where = f"{self.kind.kind} {self.namespace}/{name}"
        for _ in range(3):
            try:
                self.api.create_namespaced_custom_object(*self.resource, body)
                self.log(f"[launcher] created {where}")
                return False
            except ApiException as exc:
                if exc.status != 409:
                    raise LaunchError(f"creating {where}: HTTP {exc.status} {api_message(exc)}") from exc
            existing = self.get(name)
            if existing is None:
                continue  # deleted between our create and get: create again
            annotations = existing.get("metadata", {}).get("annotations") or {}
            owner = (annotations.get(RUN_ID_ANNOTATION), annotations.get(TASK_ANNOTATION))
            if owner != (run_id, task):
                raise LaunchError(
                    f"{where} exists but was not launched by run {run_id!r} task {task!r} "
                    f"(its annotations say run {owner[0]!r} task {owner[1]!r}); refusing to adopt it"
                )
            state, reason, message = job_state(existing, self.kind.succeeded)
            deleting = bool(existing.get("metadata", {}).get("deletionTimestamp"))
            if state != "Failed" and not deleting:
                self.log(f"[launcher] adopted existing {where} ({state})")
                return True
            why = "being deleted" if deleting else f"{reason}: {message}"
            self.log(f"[launcher] replacing {where} ({why})")
            if not deleting:
                self.delete(name)
            self._wait_gone(name)
        raise LaunchError(f"{where}: could not create or adopt it after 3 attempts")

    def _wait_gone(self, name: str, limit: float = 600) -> None:
        end = time.monotonic() + limit
        while self.get(name) is not None:
            if time.monotonic() > end:
                raise LaunchError(f"{self.kind.kind} {self.namespace}/{name} still exists {limit:g} s after deletion")
            time.sleep(self.poll)

    def wait(self, name: str, timeout: float) -> dict[str, Any] | None:
        """Poll until the job succeeds or fails (returns it) or ``timeout`` passes (returns None)."""
        end = time.monotonic() + timeout
        last = None
        while True:
            job = self.get(name)
            if job is None:
                raise LaunchError(f"{self.kind.kind} {self.namespace}/{name} was deleted while the launcher waited")
            state, reason, message = job_state(job, self.kind.succeeded)
            if (state, reason) != last:
                detail = f" ({message})" if message else ""
                self.log(f"[launcher] {self.kind.kind} {self.namespace}/{name}: {state}{detail}")
                last = (state, reason)
            if state in (self.kind.succeeded, "Failed"):
                return job
            if time.monotonic() >= end:
                return None
            time.sleep(min(self.poll, max(0.0, end - time.monotonic())))


_EPOCH = datetime.min.replace(tzinfo=UTC)


class _Pods:
    """Reading the job's pods and logs (CoreV1Api)."""

    def __init__(self, api: client.CoreV1Api, kind: JobKind, namespace: str, job: str, lines: int):
        self.api, self.kind, self.namespace, self.job, self.lines = api, kind, namespace, job, lines
        self.container = kind.container

    def list(self, first_node: bool = False) -> list[client.V1Pod]:
        selector = f"{self.kind.job_label}={self.job}" + (f",{self.kind.first_node}" if first_node else "")
        return self.api.list_namespaced_pod(self.namespace, label_selector=selector).items

    def first(self) -> client.V1Pod | None:
        """The first node's pod; the newest if it was replaced (a Job recreates an evicted pod)."""
        pods = self.list(first_node=True)
        return max(pods, key=lambda p: p.metadata.creation_timestamp or _EPOCH) if pods else None

    def status(self, pod: client.V1Pod) -> client.V1ContainerStatus | None:
        statuses = (pod.status.container_statuses if pod.status else None) or []
        return next((s for s in statuses if s.name == self.container), None)

    def tail(self, pod: str, previous: bool = False) -> list[str]:
        try:
            text = self.api.read_namespaced_pod_log(
                pod, self.namespace, container=self.container, tail_lines=self.lines, previous=previous
            )
        except ApiException:
            return []
        return text.splitlines()[-self.lines :]

    def failure_tail(self) -> tuple[str | None, list[str]]:
        """The pod whose training container exited non-zero first (the others usually die of the
        collective it left), with the last log lines of that run of the container."""
        failed = []
        for pod in self.list():
            status = self.status(pod)
            if status is None:
                continue
            for previous, state in ((False, status.state), (True, status.last_state)):
                term = state.terminated if state else None
                if term is not None and term.exit_code:
                    when = term.finished_at.timestamp() if term.finished_at else float("inf")
                    failed.append((when, pod.metadata.name, previous, term))
                    break
        if not failed:
            return self.first_tail()
        _, pod, previous, term = min(failed, key=lambda f: (f[0], f[1]))
        why = f"container {self.container} exited {term.exit_code}" + (f" ({term.reason})" if term.reason else "")
        return f"{pod}: {why}", self.tail(pod, previous)

    def first_tail(self) -> tuple[str | None, list[str]]:
        pod = self.first()
        if pod is None:
            return None, []
        return pod.metadata.name, self.tail(pod.metadata.name)


class _LogFollower(threading.Thread):
    """Copies the first node's training container log to ``log`` as it is written. Each container run (pod uid,
    restart count) is followed once to its end; a dropped stream is re-followed, skipping lines already
    copied, and a restarted container is followed from its start."""

    def __init__(self, api: client.CoreV1Api, kind: JobKind, namespace: str, job: str, poll: float, log: Log):
        super().__init__(name=f"logs-{job}", daemon=True)
        self.pods = _Pods(api, kind, namespace, job, 0)
        self.api, self.namespace, self.poll, self.log = api, namespace, poll, log
        self._stop_event = threading.Event()
        self._drain_event = threading.Event()
        self._response: Any = None
        self.copied: dict[tuple[str, int], int] = {}
        self._finished: set[tuple[str, int]] = set()
        self._waiting: str | None = None
        self._problem: str | None = None

    def drain(self, timeout: float = 60) -> None:
        """Make one last pass over the first node's log (the job has ended), then return."""
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
                problem = f"[launcher] cannot read the first node's log: {str(exc).strip().splitlines()[0]}"
                if problem != self._problem:  # once per distinct problem, not every poll
                    self.log(problem)
                    self._problem = problem
            if last_pass:
                return
            self._drain_event.wait(self.poll)

    def _follow_once(self) -> None:
        pod = self.pods.first()
        if pod is None:
            return
        status = self.pods.status(pod)
        if status is None or status.state is None or status.state.waiting is not None:
            self._report_waiting(pod, status)
            return
        key = (pod.metadata.uid or pod.metadata.name, status.restart_count or 0)
        if key in self._finished:
            return
        ended = status.state.terminated is not None
        self._response = self.api.read_namespaced_pod_log(
            pod.metadata.name, self.namespace, container=self.pods.container, follow=True, _preload_content=False
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
