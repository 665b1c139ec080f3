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
