"""TrainJob + ClusterTrainingRuntime rendering, validated against Kubeflow Trainer v2.3.0's CRDs (strict) and the
webhook/plugin rules (docev.k8s.admission), and compared with the PyTorchJob's pod: both kinds get the same pod."""

import copy
from pathlib import Path

import pytest
import yaml

from docev.config import ConfigError, load_config
from docev.k8s.admission import (
    STOCK_RUNTIME,
    effective_pod,
    pytorchjob_errors,
    runtime_errors,
    trainjob_errors,
)
from docev.k8s.meta import RUN_ID_ANNOTATION, RUN_ID_LABEL
from docev.k8s.pytorchjob import render_pytorchjob
from docev.k8s.trainjob import node_pod_spec, render_runtime, render_trainjob, runtime_drift

# what every CUDA pod of the preview gets (docev.k8s.pod.cuda_env): allocator, NCCL transport in the log, caches
CUDA_ENV = ["PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"]

REPO = Path(__file__).resolve().parents[2]
PREVIEW = REPO / "configs" / "docev_preview.yaml"
ON_PVC = "/mnt/docev/configs/docev_preview.yaml"
RUN = "7f1c2a9e-3d4b-4c5d-8e6f-0a1b2c3d4e5f"


def preview(*overrides: str):
    return load_config(PREVIEW, list(overrides))


def render(cfg, name="docev-train", config_path=ON_PVC, **kw):
    """A TrainJob of ``cfg`` under the standalone job's name, reading the config from the volume."""
    return render_trainjob(cfg, name=name, config_path=config_path, **kw)


def node_patch(job):
    (patch,) = job["spec"]["runtimePatches"]
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    return rjob["template"]["spec"]["template"]


@pytest.mark.parametrize("nodes,gpus", [(1, 8), (2, 8), (4, 8)], ids=["1-node", "2-nodes", "4-nodes-x-8-gpus"])
def test_rendered_trainjobs_and_runtime_pass_the_crds_and_webhook_rules(nodes, gpus):
    overrides = [f"train.nnodes={nodes}", f"train.nproc_per_node={gpus}", f"train.resources.gpu={gpus}"]
    cfg = preview(*overrides)
    runtime = render_runtime(cfg)
    job = render(cfg, overrides=overrides, run_id=RUN, task="train")
    assert runtime_errors(runtime) == []
    assert trainjob_errors(job, runtime) == []
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (nodes, gpus)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert trainer["command"] == ["docev", "train", "--config", ON_PVC, *overrides, "train.backend=local"]
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]  # the torch plugin's
    pod = effective_pod(runtime, job, rank=nodes - 1)
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_NODE_RANK"]) == (
        str(nodes),
        str(gpus),
        str(nodes - 1),
    )


def test_the_validators_reject_what_trainer_would():
    cfg = preview()
    runtime, job = render_runtime(cfg), render(cfg, run_id=RUN, task="train")
    assert trainjob_errors(job, runtime) == []
    trainer = lambda j: j["spec"]["trainer"]  # noqa: E731
    patch = lambda j: j["spec"]["runtimePatches"][0]  # noqa: E731
    job_cases = {
        "v2.1 podTemplateOverrides": lambda j: j["spec"].update(
            podTemplateOverrides=[{"targetJobs": [{"name": "node"}]}]
        ),
        "unknown trainer field": lambda j: trainer(j).update(numNode=2),
        "numNodes as a string": lambda j: trainer(j).update(numNodes="2"),
        "reserved PET_MASTER_ADDR": lambda j: trainer(j)["env"].append({"name": "PET_MASTER_ADDR", "value": "x"}),
        "reserved PET_NNODES": lambda j: trainer(j)["env"].append({"name": "PET_NNODES", "value": "2"}),
        "field runtimePatches cannot set": lambda j: node_patch(j)["spec"].update(hostNetwork=True),
        "container field runtimePatches cannot set": lambda j: node_patch(j)["spec"]["containers"][0].update(image="x"),
        "patch without manager": lambda j: patch(j).pop("manager"),
        "two patches of one manager": lambda j: j["spec"]["runtimePatches"].append(copy.deepcopy(patch(j))),
        "patch of a job the runtime lacks": lambda j: patch(j)["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"
        ][0].update(name="launcher"),
        "patch of a container the runtime lacks": lambda j: node_patch(j)["spec"]["containers"][0].update(name="x"),
        "mount of a volume nobody defines": lambda j: node_patch(j)["spec"]["volumes"].pop(),
        "runtimeRef of another kind": lambda j: j["spec"]["runtimeRef"].update(kind="TrainingRuntimes"),
        "runtimeRef without name": lambda j: j["spec"]["runtimeRef"].pop("name"),
        "runtimeRef of another runtime": lambda j: j["spec"]["runtimeRef"].update(name="torch-distributed"),
        "bad name": lambda j: j["metadata"].update(name="1-train"),
        "non-positive deadline": lambda j: j["spec"].update(activeDeadlineSeconds=0),
    }
    for what, mutate in job_cases.items():
        bad = copy.deepcopy(job)
        mutate(bad)
        assert trainjob_errors(bad, runtime), what
    assert runtime_errors(runtime) == []
    pod_spec = lambda r: node_pod_spec(r)  # noqa: E731
    runtime_cases = {
        "two ML policies": lambda r: r["spec"]["mlPolicy"].update(mpi={}),
        "v2.1 torch.numProcPerNode": lambda r: r["spec"]["mlPolicy"]["torch"].update(numProcPerNode="auto"),
        "unknown container field": lambda r: pod_spec(r)["containers"][0].update(imagePullPolicyy="Always"),
        "unknown JobSet field": lambda r: r["spec"]["template"]["spec"].update(ttlSecondsAfterFinish=1),
        "runAsUser as a string": lambda r: pod_spec(r)["securityContext"].update(runAsUser="1000"),
        "unknown toleration field": lambda r: pod_spec(r)["tolerations"][0].update(effects="NoSchedule"),
        "bad name": lambda r: r["metadata"].update(name="Docev"),
    }
    for what, mutate in runtime_cases.items():
        bad = copy.deepcopy(runtime)
        mutate(bad)
        assert runtime_errors(bad), what


def test_runtime_is_the_stock_torch_runtime_plus_our_pod():
    stock = yaml.safe_load(STOCK_RUNTIME.read_text())
    assert runtime_errors(stock) == []
    cfg = preview()
    ours = render_runtime(cfg)
    assert (ours["apiVersion"], ours["kind"]) == (stock["apiVersion"], stock["kind"])
    assert ours["metadata"]["name"] == "docev-torch-distributed" and "namespace" not in ours["metadata"]
    assert stock["metadata"]["labels"].items() <= ours["metadata"]["labels"].items()
    assert ours["spec"]["mlPolicy"] == stock["spec"]["mlPolicy"]
    (stock_job,) = stock["spec"]["template"]["spec"]["replicatedJobs"]
    (our_job,) = ours["spec"]["template"]["spec"]["replicatedJobs"]
    assert our_job["name"] == stock_job["name"] == "node"
    assert our_job["template"]["metadata"] == stock_job["template"]["metadata"]  # trainjob-ancestor-step: trainer
    stock_pod, pod = stock_job["template"]["spec"]["template"]["spec"], node_pod_spec(ours)
    assert [c["name"] for c in pod["containers"]] == [c["name"] for c in stock_pod["containers"]] == ["node"]
    assert pod["containers"][0]["image"] == cfg.train.image
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}}]
    assert pod["containers"][0]["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["restartPolicy"] == "OnFailure" and our_job["template"]["spec"]["backoffLimit"] == 3
    assert ours["spec"]["template"]["spec"]["ttlSecondsAfterFinished"] == 7 * 24 * 3600
    no_ttl = render_runtime(
        preview("train.run_policy.ttl_seconds_after_finished=null", "train.run_policy.backoff_limit=0")
    )
    assert "ttlSecondsAfterFinished" not in no_ttl["spec"]["template"]["spec"]
    assert no_ttl["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] == 0


def test_trainjob_details():
    cfg = preview()
    job = render(cfg, run_id="run-1", task="train")
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "docev-torch-distributed",
    }
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == cfg.train.timeout_seconds
    assert spec["trainer"]["image"] == cfg.train.image
    assert spec["trainer"]["resourcesPerNode"]["requests"] == {"cpu": "64", "memory": "1000Gi"}
    (wandb,) = [e for e in spec["trainer"]["env"] if e["name"] == "WANDB_API_KEY"]
    assert wandb == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "docev-wandb", "key": "api-key"}}}
    assert job["metadata"]["annotations"][RUN_ID_ANNOTATION] == "run-1"
    (patch,) = spec["runtimePatches"]
    assert patch["manager"] == "docev-pipelines"
    assert patch["trainingRuntimeSpec"]["template"]["metadata"]["labels"][RUN_ID_LABEL] == "run-1"  # the JobSet
    pod = node_patch(job)
    assert pod["metadata"]["labels"][RUN_ID_LABEL] == "run-1"
    assert pod["metadata"]["annotations"][RUN_ID_ANNOTATION] == "run-1"
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]} == {
        "data": "docev-data",
        "checkpoints": "docev-checkpoints",
    }
    assert pod["spec"]["containers"] == [
        {
            "name": "node",
            "volumeMounts": [
                {"name": "data", "mountPath": "/mnt/docev"},
                {
                    "name": "checkpoints",
                    "mountPath": "/mnt/docev/runs/docev-preview/checkpoints",
                    "subPath": "runs/docev-preview/checkpoints",
                },
            ],
        }
    ]


def test_knobs_reach_the_trainjob():
    cfg = preview("kubernetes.wandb_secret=null", "kubernetes.checkpoint_pvc=null", "train.runtime=docev-torch-h100")
    runtime, job = render_runtime(cfg), render(cfg)
    assert runtime["metadata"]["name"] == job["spec"]["runtimeRef"]["name"] == "docev-torch-h100"
    assert trainjob_errors(job, runtime) == []
    assert [e["name"] for e in job["spec"]["trainer"]["env"]] == ["PYTHONUNBUFFERED", *CUDA_ENV]
    assert [v["name"] for v in node_patch(job)["spec"]["volumes"]] == ["data"]
    with pytest.raises(ConfigError, match="train.runtime: 'Docev' is not a valid Kubernetes object name"):
        preview("train.runtime=Docev")


_INTERCONNECT = ('train.resources.extra={"rdma/ib": 1}', "train.resources.ipc_lock=true",
                 'train.nccl_env={"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"}')  # fmt: skip


@pytest.mark.parametrize("overrides", [(), _INTERCONNECT], ids=["default", "rdma-ipc-lock-nccl"])
def test_both_kinds_run_the_same_pod(overrides):
    """What the PyTorchJob's pods get, the pod Trainer builds from our runtime and TrainJob gets too (the torch
    env is the controllers' own, the container name theirs); the fast-interconnect options included."""
    cfg = preview(*overrides)
    pytorch = render_pytorchjob(cfg, name="docev-train", config_path=ON_PVC, run_id=RUN, task="train")
    assert pytorchjob_errors(pytorch) == []
    master = pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    trainer = effective_pod(render_runtime(cfg), render(cfg, run_id=RUN, task="train"))
    for key in ("labels", "annotations"):
        assert master["metadata"][key].items() <= trainer["metadata"][key].items(), key
    by_name = lambda items: {i["name"]: i for i in items}  # noqa: E731
    m_spec, t_spec = master["spec"], trainer["spec"]
    assert by_name(m_spec["volumes"]) == by_name(t_spec["volumes"])
    for key in set(m_spec) - {"containers", "volumes"}:
        assert m_spec[key] == t_spec[key], key
    (m_container,), (t_container,) = m_spec["containers"], t_spec["containers"]
    assert by_name(m_container["volumeMounts"]) == by_name(t_container["volumeMounts"])
    torch_env = [e for e in t_container["env"] if e["name"].startswith("PET_")]
    assert m_container["env"] == [e for e in t_container["env"] if e not in torch_env]
    for key in set(m_container) - {"name", "volumeMounts", "env"}:
        assert m_container[key] == t_container[key], key
    assert trainjob_errors(render(cfg), render_runtime(cfg)) == []
    if overrides:
        assert t_container["resources"]["requests"]["rdma/ib"] == t_container["resources"]["limits"]["rdma/ib"] == "1"
        assert t_container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert {"name": "NCCL_IB_HCA", "value": "mlx5"} in t_container["env"]


@pytest.mark.parametrize(
    "overrides,config_path,expected",
    [
        (["output_dir=outputs/run"], ON_PVC, "output_dir: outputs/run is not below kubernetes.mount_path"),
        ([], "configs/docev_preview.yaml", "must be an absolute path"),
        (["train.nproc_per_node=16"], ON_PVC, "16 ranks per node but only 8 GPUs"),
    ],
)
def test_cluster_mistakes_are_config_errors(overrides, config_path, expected):
    with pytest.raises(ConfigError, match=expected):
        render(preview(*overrides), config_path=config_path)
    with pytest.raises(ValueError, match="TrainJob name 'Train' must be a DNS-1035 label"):
        render(preview(), name="Train")


def test_runtime_drift_compares_what_the_config_sets():
    cfg = preview()
    expected = render_runtime(cfg)
    live = copy.deepcopy(expected)
    node_pod_spec(live)["containers"][0]["terminationMessagePath"] = "/dev/termination-log"  # server-side extras
    live["spec"]["template"]["spec"]["network"] = {"enableDNSHostnames": True}
    assert runtime_drift(expected["spec"], live["spec"]) == []
    node_pod_spec(live)["tolerations"] = []
    node_pod_spec(live)["nodeSelector"]["nvidia.com/gpu.product"] = "NVIDIA-A100"
    live["spec"]["mlPolicy"] = {"numNodes": 1, "mpi": {}}
    assert runtime_drift(expected["spec"], live["spec"]) == [
        "spec.mlPolicy.torch: runtime has None, the config wants {}",
        "spec.template.spec.replicatedJobs[0].template.spec.template.spec.nodeSelector.nvidia.com/gpu.product: "
        "runtime has 'NVIDIA-A100', the config wants 'NVIDIA-H200'",
        "spec.template.spec.replicatedJobs[0].template.spec.template.spec.tolerations: runtime has [], the config "
        "wants [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]",
    ]
