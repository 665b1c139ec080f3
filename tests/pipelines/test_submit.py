"""``docev submit`` against kfp.Client over HTTP: a scripted fake of the KFP v2beta1 REST API (no KFP server
exists here; the replies follow the v2beta1 wire format of kfp-server-api). Real compile, real client."""

import json

import pytest
from conftest import CONFIGS
from k8s.fake_apiserver import FakeApiServer, Reply

from docev.config import load_config
from docev.pipeline.submit import submit

API = "/apis/v2beta1"


@pytest.fixture
def server(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # kfp.Client reads ~/.config/kfp/context.json
    with FakeApiServer() as fake:
        yield fake


def _script(fake, *, pipeline_exists: bool, version_exists: bool) -> None:
    fake.script("GET", f"{API}/healthz", Reply(200, {"commit_sha": "fake", "multi_user": False}))
    pipelines = {"pipelines": [{"pipeline_id": "p-1", "display_name": "docev-finetune"}]} if pipeline_exists else {}
    fake.script("GET", f"{API}/pipelines", Reply(200, pipelines))
    fake.script("POST", f"{API}/pipelines/upload", Reply(200, {"pipeline_id": "p-1", "display_name": "docev-finetune"}))

    def versions(req):
        name = json.loads(req.query["filter"])["predicates"][0]["stringValue"]
        found = [{"pipeline_id": "p-1", "pipeline_version_id": "ver-old", "display_name": name}]
        return Reply(200, {"pipeline_versions": found} if version_exists else {})

    fake.script("GET", f"{API}/pipelines/p-1/versions", versions)
    fake.script("POST", f"{API}/pipelines/upload_version",
                Reply(200, {"pipeline_id": "p-1", "pipeline_version_id": "ver-new", "display_name": "v"}))  # fmt: skip
    fake.script(
        "GET", f"{API}/experiments", Reply(200, {"experiments": [{"experiment_id": "e-1", "display_name": "x"}]})
    )
    fake.script(
        "POST", f"{API}/runs", lambda req: Reply(200, {"run_id": "r-42", "display_name": req.body["display_name"]})
    )


def test_first_submit_uploads_pipeline_and_version(server):
    _script(server, pipeline_exists=False, version_exists=False)
    cfg = load_config(CONFIGS / "docev_preview.yaml")
    done = submit(cfg, experiment="docs", params={"max_steps_per_epoch": 10}, host=server.url)
    assert (done.run_id, done.pipeline_id, done.version_id, done.version_reused) == ("r-42", "p-1", "ver-new", False)
    assert done.url == f"{server.url}/#/runs/details/r-42"
    upload = server.calls("POST", f"{API}/pipelines/upload_version")[0]
    assert b"docev-finetune" in upload.body and b"config_json" in upload.body  # the compiled IR was uploaded
    run = server.calls("POST", f"{API}/runs")[0].body
    assert run["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "ver-new"}
    assert run["runtime_config"]["parameters"] == {"max_steps_per_epoch": 10}
    assert run["experiment_id"] == "e-1" and run["service_account"] == "docev-pipeline"
    assert not server.unexpected


def test_same_config_reuses_the_version(server):
    _script(server, pipeline_exists=True, version_exists=True)
    done = submit(load_config(CONFIGS / "docev_preview.yaml"), experiment="docs", host=server.url)
    assert done.version_reused and done.version_id == "ver-old"
    assert not server.calls("POST", f"{API}/pipelines/upload") and not server.calls(
        "POST", f"{API}/pipelines/upload_version"
    )
    name = json.loads(server.calls("GET", f"{API}/pipelines/p-1/versions")[0].query["filter"])["predicates"][0]
    assert name["stringValue"].startswith("v-") and len(name["stringValue"]) == 18


def test_submit_needs_a_host_and_says_so_in_one_line(monkeypatch, capsys):
    from docev.cli import main

    for name in ("KFP_HOST", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["submit", "--config", str(CONFIGS / "docev_preview.yaml"), "--experiment", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "config error:" and len(err) == 2 and "--host" in err[1] and "KFP_HOST" in err[1]


def test_an_unreachable_host_is_one_line_after_the_compile(monkeypatch, tmp_path, capsys):
    import socket

    from docev.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        monkeypatch.setenv("KFP_HOST", host)
        code = main(["submit", "--config", str(CONFIGS / "docev_preview.yaml"), "--experiment", "x"])
    assert code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"docev submit: KFP host {host} unreachable: ") and "refused" in err[0]


def test_a_bad_config_fails_before_any_connection(server, capsys):
    from docev.cli import main

    code = main(["submit", "--config", str(CONFIGS / "docev_preview.yaml"), "--experiment", "x",
                 "--host", server.url, "epochs=zero"])  # fmt: skip
    assert code == 2 and "epochs" in capsys.readouterr().err
    assert not server.calls("GET", f"{API}/healthz") and not server.calls("GET", f"{API}/pipelines")
