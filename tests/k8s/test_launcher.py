"""The launcher against FakeApiServer (scripted API responses over real HTTP, official kubernetes client), for
both job kinds through the same code path: the PyTorchJob (train.backend kubernetes) and the TrainJob
(train.backend trainjob)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, Reply, job_object, log_reply, recorded

from docev.config import load_config
from docev.k8s.launcher import JobFailed, JobTimeout, LaunchError, job_state, launch_job
from docev.k8s.meta import job_name
from docev.k8s.pytorchjob import render_pytorchjob
from docev.k8s.trainjob import render_runtime, render_trainjob

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/mnt/docev/configs/docev_preview.yaml"
RUN, TASK = "7f1c2a9e-3d4b-4c5d-8e6f-0a1b2c3d4e5f", "train"
NS = "docev"
NAME = job_name(RUN, TASK)
PODS = f"/api/v1/namespaces/{NS}/pods"
FILL = {"job": NAME, "namespace": NS}
RUNTIME = "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/docev-torch-distributed"


@dataclass(frozen=True)
class Kind:
    """What differs between the two job kinds, as the API server and the controllers show it."""

    backend: str
    kind: str
    jobs: str  # the collection path
    render: object
    status: dict  # created/running/succeeded/failed -> response file stem
    pods: dict  # running/failed -> response file stem
    first_pod: str  # the first node's pod (log streamed)
    other_pod: str  # the node that fails first in the *_failed recordings
    container: str
    selectors: set
    states: tuple  # the states the launcher reports for created, running, running, succeeded
    succeeded: str
    success_message: str
    failed_reason: str
    failed_message: str

    @property
    def job(self) -> str:
        return f"{self.jobs}/{NAME}"


PYTORCHJOB = Kind(
    backend="kubernetes",
    kind="PyTorchJob",
    jobs=f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs",
    render=render_pytorchjob,
    status={"created": "job_created", "running": "job_running", "succeeded": "job_succeeded", "failed": "job_failed"},
    pods={"running": "pods_running", "failed": "pods_failed"},
    first_pod=f"{NAME}-master-0",
    other_pod=f"{NAME}-worker-0",
    container="pytorch",
    selectors={
        f"training.kubeflow.org/job-name={NAME}",
        f"training.kubeflow.org/job-name={NAME},training.kubeflow.org/replica-type=master",
    },
    states=("Created", "Running", "Succeeded"),
    succeeded="Succeeded",
    success_message=f"PyTorchJob {NS}/{NAME} successfully completed.",
    failed_reason="PyTorchJobFailed",
    failed_message=f"PyTorchJob {NS}/{NAME} has failed because 1 Worker replica(s) failed.",
)
TRAINJOB = Kind(
    backend="trainjob",
    kind="TrainJob",
    jobs=f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs",
    render=render_trainjob,
    status={
        "created": "trainjob_created",
        "running": "trainjob_running",
        "succeeded": "trainjob_complete",
        "failed": "trainjob_failed",
    },
    pods={"running": "trainjob_pods_running", "failed": "trainjob_pods_failed"},
    first_pod=f"{NAME}-node-0-0-x7k2p",  # the pod the Job made after the first one was evicted
    other_pod=f"{NAME}-node-0-1-q9m4d",
    container="node",
    selectors={
        f"jobset.sigs.k8s.io/jobset-name={NAME}",
        f"jobset.sigs.k8s.io/jobset-name={NAME},jobset.sigs.k8s.io/replicatedjob-name=node,"
        "batch.kubernetes.io/job-completion-index=0",
    },
    states=("Created", "Complete"),  # a TrainJob has no Running condition
    succeeded="Complete",
    success_message="jobset completed successfully",
    failed_reason="FailedJobs",
    failed_message="jobset failed due to one or more job failures",
)
BOTH = pytest.mark.parametrize("kind", [PYTORCHJOB, TRAINJOB], ids=["pytorchjob", "trainjob"])


def config(*overrides, kind=PYTORCHJOB):
    args = ["train.poll_seconds=0.02", f"train.backend={kind.backend}", *overrides]
    return load_config(REPO / "configs" / "docev_preview.yaml", args)


def body(cfg, kind=PYTORCHJOB, run_id=RUN, task=TASK):
    return kind.render(cfg, name=NAME, config_path=CONFIG, run_id=run_id, task=task)


def state(cfg, status, kind=PYTORCHJOB, **meta):
    return Reply(200, job_object(body(cfg, kind), kind.status.get(status, status), **meta))


def pods(name):
    return Reply(200, recorded(f"{name}.json", **FILL))


def log_text(name):
    return recorded(name, **FILL)


class Sink(list):
    def __call__(self, line):
        self.append(line)


def launch(fake, cfg, **kw):
    sink = Sink()
    client = fake.api_client()
    result = launch_job(cfg, config_path=CONFIG, run_id=RUN, task=TASK, api_client=client, log=sink, **kw)
    return result, sink


def script_logs(fake, pods_file="running", kind=PYTORCHJOB):
    """The pods of the job, the first node's log (master.log) and the other node's (worker-0.log); for a
    TrainJob also its ClusterTrainingRuntime, as `make manifests` renders it from the same config."""
    fake.script("GET", PODS, pods(kind.pods.get(pods_file, pods_file)))
    fake.script("GET", f"{PODS}/{kind.first_pod}/log", log_reply(log_text("master.log")))
    fake.script("GET", f"{PODS}/{kind.other_pod}/log", log_reply(log_text("worker-0.log")))


def script_runtime(fake, cfg, kind):
    if kind is TRAINJOB:
        fake.script("GET", RUNTIME, Reply(200, job_object(render_runtime(cfg), None)))


def script_create(fake, cfg, kind):
    """The runtime check passes and the job is created (201)."""
    script_runtime(fake, cfg, kind)
    fake.script("POST", kind.jobs, Reply(201, job_object(body(cfg, kind), None)))


@BOTH
def test_create_run_succeed_streams_first_node_log_and_deletes(kind):
    cfg = config(kind=kind)
    with FakeApiServer() as fake:
        script_create(fake, cfg, kind)
        fake.script(
            "GET",
            kind.job,
            state(cfg, "created", kind),
            state(cfg, "running", kind),
            state(cfg, "running", kind),
            state(cfg, "succeeded", kind),
        )
        fake.script("DELETE", kind.job, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake, kind=kind)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        (create,) = fake.calls("POST", kind.jobs)
        assert create.body == body(cfg, kind)  # what the API server got is exactly the rendered job
        (delete,) = fake.calls("DELETE", kind.job)
        assert delete.query["propagationPolicy"] == "Foreground"
        selectors = {r.query.get("labelSelector") for r in fake.calls("GET", PODS)}
        assert selectors <= kind.selectors
        follows = fake.calls("GET", f"{PODS}/{kind.first_pod}/log")
        assert follows
        assert all(r.query["container"] == kind.container and r.query["follow"].lower() == "true" for r in follows)
        assert fake.calls("GET", f"{PODS}/{kind.other_pod}/log") == []
    assert result.name == NAME and result.namespace == NS
    assert (result.adopted, result.deleted) == (False, True)
    assert result.message == kind.success_message
    # Every first-node log line exactly once, in order, even if the stream was re-read.
    master = log_text("master.log").splitlines()
    assert [line for line in sink if not line.startswith("[launcher]")] == master
    prefix = f"[launcher] {kind.kind} {NS}/{NAME}: "
    states = [line.removeprefix(prefix) for line in sink if line.startswith(prefix)]
    assert tuple(s.split(" ")[0] for s in states) == kind.states


@BOTH
def test_conflict_adopts_the_running_job_and_keeps_it(kind):
    cfg = config("train.delete_job_on_success=false", kind=kind)
    with FakeApiServer() as fake:
        script_runtime(fake, cfg, kind)
        fake.script("POST", kind.jobs, Reply(409, recorded("status_409_already_exists.json", **FILL)))
        fake.script(
            "GET", kind.job, state(cfg, "running", kind), state(cfg, "running", kind), state(cfg, "succeeded", kind)
        )
        script_logs(fake, kind=kind)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        assert len(fake.calls("POST", kind.jobs)) == 1  # no second job
        assert fake.calls("DELETE", kind.job) == []  # delete_job_on_success=false
    assert (result.adopted, result.deleted) == (True, False)
    running = "Running" if kind is PYTORCHJOB else "Created"  # a TrainJob has no Running condition
    assert f"[launcher] adopted existing {kind.kind} {NS}/{NAME} ({running})" in sink


@pytest.mark.parametrize("rate, warned", [("0.2", True), ("1.0", False)])
def test_a_preemption_save_longer_than_the_grace_is_warned_in_the_step_log(rate, warned):
    """The preview's async save (two writes of ~134 GB) takes ~1339 s at 0.2 GB/s: past the 600 s grace."""
    cfg = config("train.delete_job_on_success=false", f"train.checkpoint_write_gb_per_second={rate}")
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(409, recorded("status_409_already_exists.json", **FILL)))
        fake.script("GET", PYTORCHJOB.job, state(cfg, "running"), state(cfg, "succeeded"))
        script_logs(fake)
        _, sink = launch(fake, cfg)
    warnings = [line for line in sink if line.startswith("[launcher] warning: train.termination_grace_seconds 600 s")]
    assert len(warnings) == warned
    if warned:
        assert "~1339 s = 2 × 133.9 GB (the async write in flight, then this step's) at " in warnings[0]
        assert "train.checkpoint_write_gb_per_second 0.2 GB/s" in warnings[0]


@BOTH
def test_conflict_with_a_job_of_another_run_is_refused(kind):
    cfg = config(kind=kind)
    with FakeApiServer() as fake:
        script_runtime(fake, cfg, kind)
        fake.script("POST", kind.jobs, Reply(409, recorded("status_409_already_exists.json", **FILL)))
        other = job_object(body(cfg, kind, run_id="someone-else"), kind.status["running"])
        fake.script("GET", kind.job, Reply(200, other))
        with pytest.raises(LaunchError, match=f"{kind.kind} {NS}/{NAME} exists but was not launched by run"):
            launch(fake, cfg)
        assert fake.calls("DELETE", kind.job) == []


@BOTH
def test_failed_job_fails_the_step_with_reason_and_failing_pod_log(kind):
    cfg = config("train.failure_log_lines=4", kind=kind)
    with FakeApiServer() as fake:
        script_create(fake, cfg, kind)
        fake.script("GET", kind.job, state(cfg, "running", kind), state(cfg, "failed", kind))
        script_logs(fake, "failed", kind=kind)
        with pytest.raises(JobFailed) as info:
            launch(fake, cfg)
        assert fake.unexpected == []
        # The job is kept for inspection (ttlSecondsAfterFinished cleans it up).
        assert fake.calls("DELETE", kind.job) == []
        tails = [r for r in fake.calls("GET", f"{PODS}/{kind.other_pod}/log") if "tailLines" in r.query]
        assert tails and tails[0].query["tailLines"] == "4" and tails[0].query["container"] == kind.container
        assert tails[0].query.get("previous", "false").lower() == "false"
    err = info.value
    assert (err.kind, err.reason, err.message) == (kind.kind, kind.failed_reason, kind.failed_message)
    # The other node exited first (10:05:12, the first node at 10:05:29): it is the one to blame.
    assert err.pod == f"{kind.other_pod}: container {kind.container} exited 1 (Error)"
    assert err.log_tail == log_text("worker-0.log").splitlines()[-4:]
    text = str(err)
    assert text.startswith(f"{kind.kind} {NS}/{NAME} failed: {kind.failed_reason}: {kind.failed_message}")
    assert "ShardError" in text and "sha256 mismatch" in text


@BOTH
def test_timeout_deletes_the_job_and_fails(kind):
    cfg = config(kind=kind)
    with FakeApiServer() as fake:
        script_create(fake, cfg, kind)
        fake.script("GET", kind.job, state(cfg, "running", kind))
        fake.script("DELETE", kind.job, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake, kind=kind)
        with pytest.raises(JobTimeout) as info:
            launch(fake, cfg, wait_timeout_seconds=0.3)
        assert len(fake.calls("DELETE", kind.job)) == 1
    err = info.value
    assert isinstance(err, JobFailed) and err.reason == "Timeout"
    assert "not finished after 0.3 s" in str(err)
    assert err.pod == kind.first_pod
    assert err.log_tail == log_text("master.log").splitlines()


def test_trainjob_needs_its_runtime():
    """No TrainJob is created when the runtime is missing (the webhook would refuse it with less to go on)."""
    cfg = config(kind=TRAINJOB)
    with FakeApiServer() as fake:
        fake.script("GET", RUNTIME, Reply(404, recorded("status_404_not_found.json", **FILL)))
        with pytest.raises(LaunchError, match="ClusterTrainingRuntime 'docev-torch-distributed' .* not found"):
            launch(fake, cfg)
        assert fake.calls("POST", TRAINJOB.jobs) == []


def test_trainjob_refuses_a_runtime_that_differs_from_the_config():
    cfg = config(kind=TRAINJOB)
    stale = render_runtime(config("train.resources.shm_size=16Gi", "kubernetes.run_as_user=2000", kind=TRAINJOB))
    stale["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "image"
    ] = "example.org/other:1"  # the TrainJob sets the image: not a difference
    with FakeApiServer() as fake:
        fake.script("GET", RUNTIME, Reply(200, job_object(stale, None)))
        with pytest.raises(LaunchError, match="does not match the config") as info:
            launch(fake, cfg)
        assert fake.calls("POST", TRAINJOB.jobs) == []
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 2, lines
    assert "securityContext.runAsUser: runtime has 2000, the config wants 1000" in lines[0]
    assert "sizeLimit: runtime has '16Gi', the config wants '64Gi'" in lines[1]


def test_a_local_backend_is_not_launched():
    with pytest.raises(ValueError, match="train.backend: 'local' trains in place"):
        launch_job(config("train.backend=local"), config_path=CONFIG, run_id=RUN, task=TASK, api_client=object())


def test_conflict_with_own_failed_job_replaces_it():
    """A KFP retry of a failed step trains again instead of re-reporting the old failure."""
    cfg = config()
    with FakeApiServer() as fake:
        fake.script(
            "POST",
            PYTORCHJOB.jobs,
            Reply(409, recorded("status_409_already_exists.json", **FILL)),
            Reply(201, job_object(body(cfg), None)),
        )
        fake.script(
            "GET",
            PYTORCHJOB.job,
            state(cfg, "failed"),  # the adopt check
            state(cfg, "failed", deletionTimestamp="2026-11-20T10:10:00Z"),  # foreground deletion in progress
            Reply(404, recorded("status_404_not_found.json", **FILL)),  # gone
            state(cfg, "running"),
            state(cfg, "succeeded"),
        )
        fake.script("DELETE", PYTORCHJOB.job, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        assert len(fake.calls("POST", PYTORCHJOB.jobs)) == 2
        assert len(fake.calls("DELETE", PYTORCHJOB.job)) == 2  # the failed job, then the finished one
    assert result.adopted is False
    assert any(line.startswith(f"[launcher] replacing PyTorchJob {NS}/{NAME} (PyTorchJobFailed") for line in sink)


def test_crashlooping_pod_reports_the_previous_container_log():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", PYTORCHJOB.job, state(cfg, "failed"))
        script_logs(fake, "pods_crashloop")
        with pytest.raises(JobFailed) as info:
            launch(fake, cfg)
        tails = [r for r in fake.calls("GET", f"{PODS}/{NAME}-worker-0/log") if "tailLines" in r.query]
        assert tails[0].query["previous"].lower() == "true"
    assert info.value.pod == f"{NAME}-worker-0: container pytorch exited 137 (OOMKilled)"


def test_pending_pod_reasons_are_reported():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", PYTORCHJOB.job, state(cfg, "created"), state(cfg, "created"), state(cfg, "succeeded"))
        fake.script("DELETE", PYTORCHJOB.job, Reply(200, recorded("status_deleted.json", **FILL)))
        fake.script("GET", PODS, pods("pods_pending"))
        _, sink = launch(fake, cfg)
    waiting = [line for line in sink if "waiting:" in line]
    assert waiting == [
        f'[launcher] pod {NAME}-master-0 waiting: CreateContainerConfigError: secret "docev-wandb" not found'
    ]


def test_api_errors_are_launch_errors_with_the_server_message():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(403, recorded("status_403_forbidden.json", **FILL)))
        with pytest.raises(LaunchError, match="HTTP 403 .*cannot create resource"):
            launch(fake, cfg)


def test_log_follower_skips_lines_already_copied_and_follows_restarts():
    """A dropped stream is re-read without duplicates; a restarted container is followed from its start."""
    cfg = config("train.delete_job_on_success=false")
    first = recorded("pods_running.json", **FILL)
    restarted = recorded("pods_running.json", **FILL)
    restarted["items"][0]["status"]["containerStatuses"][0]["restartCount"] = 1
    master_log = f"{PODS}/{NAME}-master-0/log"
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(201, job_object(body(cfg), None)))
        # The job ends only once the follower has read the log three times (no reliance on timing).
        fake.script(
            "GET",
            PYTORCHJOB.job,
            lambda req: state(cfg, "running" if len(fake.calls("GET", master_log)) < 3 else "job_succeeded"),
        )
        fake.script("GET", PODS, Reply(200, first), Reply(200, first), Reply(200, restarted))
        fake.script("GET", master_log, Reply(200, "a\nb\n"), Reply(200, "a\nb\nc\n"), Reply(200, "x\ny"))
        _, sink = launch(fake, cfg)
    assert [line for line in sink if not line.startswith("[launcher]")] == ["a", "b", "c", "x", "y"]


def test_job_state_reads_operator_conditions():
    cfg = config()
    assert job_state(job_object(body(cfg), None)) == ("Pending", "", "")
    assert job_state(job_object(body(cfg), "job_created"))[0] == "Created"
    assert job_state(job_object(body(cfg), "job_running"))[:2] == ("Running", "PyTorchJobRunning")
    # Running is flipped to False when the job ends; the terminal condition wins regardless of order.
    done = job_object(body(cfg), "job_succeeded")
    done["status"]["conditions"].reverse()
    assert job_state(done)[0] == "Succeeded"
    assert job_state(job_object(body(cfg), "job_failed"))[:2] == ("Failed", "PyTorchJobFailed")


def test_unreadable_log_is_reported_once_and_does_not_stop_the_wait():
    cfg = config()
    forbidden = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403}
    with FakeApiServer() as fake:
        fake.script("POST", PYTORCHJOB.jobs, Reply(201, job_object(body(cfg), None)))
        master_log = f"{PODS}/{NAME}-master-0/log"
        fake.script(
            "GET",
            PYTORCHJOB.job,
            lambda req: state(cfg, "running" if len(fake.calls("GET", master_log)) < 3 else "job_succeeded"),
        )
        fake.script("DELETE", PYTORCHJOB.job, Reply(200, recorded("status_deleted.json", **FILL)))
        fake.script("GET", PODS, pods("pods_running"))
        fake.script("GET", master_log, Reply(403, forbidden))
        result, sink = launch(fake, cfg)
    assert result.deleted
    problems = [line for line in sink if "cannot read the first node's log" in line]
    assert len(problems) == 1 and "403" in problems[0]


def test_job_state_reads_trainer_conditions():
    cfg = config(kind=TRAINJOB)
    job = lambda status: job_object(body(cfg, TRAINJOB), status)  # noqa: E731
    assert job_state(job(None), "Complete") == ("Pending", "", "")
    assert job_state(job("trainjob_running"), "Complete")[:2] == ("Created", "JobsCreationSucceeded")
    assert job_state(job("trainjob_complete"), "Complete") == (
        "Complete",
        "AllJobsCompleted",
        "jobset completed successfully",
    )
    assert job_state(job("trainjob_failed"), "Complete")[:2] == ("Failed", "FailedJobs")
