"""The launcher against FakeApiServer (scripted API responses over real HTTP, official kubernetes client)."""

from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, Reply, job_object, log_reply, recorded

from docev.config import load_config
from docev.k8s.launcher import (
    LaunchError,
    PyTorchJobFailed,
    PyTorchJobTimeout,
    job_state,
    launch_pytorchjob,
)
from docev.k8s.pytorchjob import job_name, render_pytorchjob

REPO = Path(__file__).resolve().parents[2]
CONFIG = "/mnt/docev/configs/docev_preview.yaml"
RUN, TASK = "7f1c2a9e-3d4b-4c5d-8e6f-0a1b2c3d4e5f", "train"
NS = "docev"
NAME = job_name(RUN, TASK)
JOBS = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
JOB = f"{JOBS}/{NAME}"
PODS = f"/api/v1/namespaces/{NS}/pods"
FILL = {"job": NAME, "namespace": NS}


def config(*overrides):
    return load_config(REPO / "configs" / "docev_preview.yaml", ["train.poll_seconds=0.02", *overrides])


def body(cfg, run_id=RUN, task=TASK):
    return render_pytorchjob(cfg, name=NAME, config_path=CONFIG, run_id=run_id, task=task)


def state(cfg, status, **meta):
    return Reply(200, job_object(body(cfg), status, **meta))


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
    result = launch_pytorchjob(cfg, config_path=CONFIG, run_id=RUN, task=TASK, api_client=client, log=sink, **kw)
    return result, sink


def script_logs(fake, pods_file="pods_running"):
    fake.script("GET", PODS, pods(pods_file))
    fake.script("GET", f"{PODS}/{NAME}-master-0/log", log_reply(log_text("master.log")))
    fake.script("GET", f"{PODS}/{NAME}-worker-0/log", log_reply(log_text("worker-0.log")))


def test_create_run_succeed_streams_master_log_and_deletes():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        fake.script(
            "GET",
            JOB,
            state(cfg, "job_created"),
            state(cfg, "job_running"),
            state(cfg, "job_running"),
            state(cfg, "job_succeeded"),
        )
        fake.script("DELETE", JOB, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        (create,) = fake.calls("POST", JOBS)
        assert create.body == body(cfg)  # what the API server got is exactly the rendered job
        (delete,) = fake.calls("DELETE", JOB)
        assert delete.query["propagationPolicy"] == "Foreground"
        selectors = {r.query.get("labelSelector") for r in fake.calls("GET", PODS)}
        assert selectors <= {
            f"training.kubeflow.org/job-name={NAME}",
            f"training.kubeflow.org/job-name={NAME},training.kubeflow.org/replica-type=master",
        }
        follows = fake.calls("GET", f"{PODS}/{NAME}-master-0/log")
        assert follows
        assert all(r.query["container"] == "pytorch" and r.query["follow"].lower() == "true" for r in follows)
    assert result.name == NAME and result.namespace == NS
    assert (result.adopted, result.deleted) == (False, True)
    assert result.message == f"PyTorchJob {NS}/{NAME} successfully completed."
    # Every master log line exactly once, in order, even if the stream was re-read.
    master = log_text("master.log").splitlines()
    assert [line for line in sink if not line.startswith("[launcher]")] == master
    states = [line.split(": ", 1)[1] for line in sink if line.startswith(f"[launcher] PyTorchJob {NS}/{NAME}: ")]
    assert [s.split(" ")[0] for s in states] == ["Created", "Running", "Succeeded"]


def test_conflict_adopts_the_running_job_and_keeps_it():
    cfg = config("train.delete_job_on_success=false")
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(409, recorded("status_409_already_exists.json", **FILL)))
        fake.script("GET", JOB, state(cfg, "job_running"), state(cfg, "job_running"), state(cfg, "job_succeeded"))
        script_logs(fake)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        assert len(fake.calls("POST", JOBS)) == 1  # no second job
        assert fake.calls("DELETE", JOB) == []  # delete_job_on_success=false
    assert (result.adopted, result.deleted) == (True, False)
    assert f"[launcher] adopted existing PyTorchJob {NS}/{NAME} (Running)" in sink


def test_conflict_with_a_job_of_another_run_is_refused():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(409, recorded("status_409_already_exists.json", **FILL)))
        fake.script("GET", JOB, Reply(200, job_object(body(cfg, run_id="someone-else"), "job_running")))
        with pytest.raises(LaunchError, match="not launched by run"):
            launch(fake, cfg)
        assert fake.calls("DELETE", JOB) == []


def test_conflict_with_own_failed_job_replaces_it():
    """A KFP retry of a failed step trains again instead of re-reporting the old failure."""
    cfg = config()
    with FakeApiServer() as fake:
        fake.script(
            "POST",
            JOBS,
            Reply(409, recorded("status_409_already_exists.json", **FILL)),
            Reply(201, job_object(body(cfg), None)),
        )
        fake.script(
            "GET",
            JOB,
            state(cfg, "job_failed"),  # the adopt check
            state(cfg, "job_failed", deletionTimestamp="2026-11-20T10:10:00Z"),  # foreground deletion in progress
            Reply(404, recorded("status_404_not_found.json", **FILL)),  # gone
            state(cfg, "job_running"),
            state(cfg, "job_succeeded"),
        )
        fake.script("DELETE", JOB, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake)
        result, sink = launch(fake, cfg)
        assert fake.unexpected == []
        assert len(fake.calls("POST", JOBS)) == 2
        assert len(fake.calls("DELETE", JOB)) == 2  # the failed job, then the finished one
    assert result.adopted is False
    assert any(line.startswith(f"[launcher] replacing PyTorchJob {NS}/{NAME} (PyTorchJobFailed") for line in sink)


def test_failed_job_fails_the_step_with_reason_and_failing_pod_log():
    cfg = config("train.failure_log_lines=4")
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", JOB, state(cfg, "job_running"), state(cfg, "job_failed"))
        script_logs(fake, "pods_failed")
        with pytest.raises(PyTorchJobFailed) as info:
            launch(fake, cfg)
        assert fake.unexpected == []
        # The job is kept for inspection (ttlSecondsAfterFinished cleans it up).
        assert fake.calls("DELETE", JOB) == []
        tails = [r for r in fake.calls("GET", f"{PODS}/{NAME}-worker-0/log") if "tailLines" in r.query]
        assert tails and tails[0].query["tailLines"] == "4"
        assert tails[0].query.get("previous", "false").lower() == "false"
    err = info.value
    assert err.reason == "PyTorchJobFailed"
    assert err.message == f"PyTorchJob {NS}/{NAME} has failed because 1 Worker replica(s) failed."
    # The worker exited first (10:05:12, the master at 10:05:29): it is the one to blame.
    assert err.pod == f"{NAME}-worker-0: container pytorch exited 1 (Error)"
    assert err.log_tail == log_text("worker-0.log").splitlines()[-4:]
    text = str(err)
    assert "ShardError" in text and "sha256 mismatch" in text and "has failed because" in text


def test_crashlooping_pod_reports_the_previous_container_log():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", JOB, state(cfg, "job_failed"))
        script_logs(fake, "pods_crashloop")
        with pytest.raises(PyTorchJobFailed) as info:
            launch(fake, cfg)
        tails = [r for r in fake.calls("GET", f"{PODS}/{NAME}-worker-0/log") if "tailLines" in r.query]
        assert tails[0].query["previous"].lower() == "true"
    assert info.value.pod == f"{NAME}-worker-0: container pytorch exited 137 (OOMKilled)"


def test_timeout_deletes_the_job_and_fails():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", JOB, state(cfg, "job_running"))
        fake.script("DELETE", JOB, Reply(200, recorded("status_deleted.json", **FILL)))
        script_logs(fake)
        with pytest.raises(PyTorchJobTimeout) as info:
            launch(fake, cfg, wait_timeout_seconds=0.3)
        assert len(fake.calls("DELETE", JOB)) == 1
    err = info.value
    assert isinstance(err, PyTorchJobFailed) and err.reason == "Timeout"
    assert "not finished after 0.3 s" in str(err)
    assert err.pod == f"{NAME}-master-0"
    assert err.log_tail == log_text("master.log").splitlines()


def test_pending_pod_reasons_are_reported():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        fake.script("GET", JOB, state(cfg, "job_created"), state(cfg, "job_created"), state(cfg, "job_succeeded"))
        fake.script("DELETE", JOB, Reply(200, recorded("status_deleted.json", **FILL)))
        fake.script("GET", PODS, pods("pods_pending"))
        _, sink = launch(fake, cfg)
    waiting = [line for line in sink if "waiting:" in line]
    assert waiting == [
        f'[launcher] pod {NAME}-master-0 waiting: CreateContainerConfigError: secret "docev-wandb" not found'
    ]


def test_api_errors_are_launch_errors_with_the_server_message():
    cfg = config()
    with FakeApiServer() as fake:
        fake.script("POST", JOBS, Reply(403, recorded("status_403_forbidden.json", **FILL)))
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
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        # The job ends only once the follower has read the log three times (no reliance on timing).
        fake.script(
            "GET",
            JOB,
            lambda req: state(cfg, "job_running" if len(fake.calls("GET", master_log)) < 3 else "job_succeeded"),
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
        fake.script("POST", JOBS, Reply(201, job_object(body(cfg), None)))
        master_log = f"{PODS}/{NAME}-master-0/log"
        fake.script(
            "GET",
            JOB,
            lambda req: state(cfg, "job_running" if len(fake.calls("GET", master_log)) < 3 else "job_succeeded"),
        )
        fake.script("DELETE", JOB, Reply(200, recorded("status_deleted.json", **FILL)))
        fake.script("GET", PODS, pods("pods_running"))
        fake.script("GET", master_log, Reply(403, forbidden))
        result, sink = launch(fake, cfg)
    assert result.deleted
    problems = [line for line in sink if "cannot read the master's log" in line]
    assert len(problems) == 1 and "403" in problems[0]
