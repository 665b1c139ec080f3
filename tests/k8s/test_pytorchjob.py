import copy
from pathlib import Path

import pytest

from docev.config import ConfigError, load_config
from docev.k8s.admission import admission_errors, crd_validator, pytorchjob_errors
from docev.k8s.meta import MAX_JOB_NAME, RUN_ID_ANNOTATION, RUN_ID_LABEL, job_name, label_value, to_yaml
from docev.k8s.pod import volume_mounts
from docev.k8s.pytorchjob import render_pytorchjob

REPO = Path(__file__).resolve().parents[2]
PREVIEW = REPO / "configs" / "docev_preview.yaml"
ON_PVC = "/mnt/docev/configs/docev_preview.yaml"
# what every CUDA pod of the preview gets (docev.k8s.pod.cuda_env): allocator, NCCL transport in the log, caches
CUDA_ENV = ["PYTORCH_CUDA_ALLOC_CONF", "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"]


def preview(*overrides: str):
    return load_config(PREVIEW, list(overrides))


def render(cfg, **kw):
    kw.setdefault("name", "docev-train")
    kw.setdefault("config_path", ON_PVC)
    return render_pytorchjob(cfg, **kw)


def container(job, rtype="Master"):
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "nodes,gpus",
    [(1, 8), (2, 8), (4, 8)],
    ids=["1-node", "2-nodes", "4-nodes-x-8-gpus"],
)
def test_rendered_jobs_pass_crd_schema_and_admission_rules(nodes, gpus):
    overrides = [f"train.nnodes={nodes}", f"train.nproc_per_node={gpus}", f"train.resources.gpu={gpus}"]
    cfg = preview(*overrides)
    job = render(cfg, overrides=overrides, run_id="7f1c2a9e-3d4b-4c5d-8e6f-0a1b2c3d4e5f", task="train")
    assert pytorchjob_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert ("Worker" in replicas) == (nodes > 1)
    if nodes > 1:
        assert replicas["Worker"]["replicas"] == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(gpus)
    for rtype in replicas:
        c = container(job, rtype)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert c["command"] == ["docev", "train", "--config", ON_PVC, *overrides, "train.backend=local"]
        assert replicas[rtype]["restartPolicy"] == "OnFailure"
        assert replicas[rtype]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


def test_termination_grace_comes_from_the_config():
    """SIGTERM → SIGKILL: the time the pods get to finish the step in flight and save it."""
    job = render(preview("train.termination_grace_seconds=1800"))
    assert pytorchjob_errors(job) == []
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] == 1800
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["terminationGracePeriodSeconds"] = "1800"
    assert pytorchjob_errors(bad)  # the CRD wants an integer
    with pytest.raises(ConfigError, match="train.termination_grace_seconds"):
        preview("train.termination_grace_seconds=0")


def _replicas(j):
    return j["spec"]["pytorchReplicaSpecs"]


_MASTER_CONTAINER = "spec.pytorchReplicaSpecs.Master.template.spec.containers.0"
# (mutation, the errors it must cause: exactly these, each with its path and message)
SCHEMA_CASES = {  # caught by the CRD's openAPIV3Schema (made strict) or the core PodTemplate schema
    "unknown container field": (
        lambda j: container(j).update(imagePullPolicyy="Always"),
        [
            f"{_MASTER_CONTAINER}: Additional properties are not allowed ('imagePullPolicyy' was unexpected)",
            "Master template: PodTemplate docev-train-master: Additional properties are not allowed "
            "('imagePullPolicyy' was unexpected) at ['template', 'spec', 'containers', 0]",
        ],
    ),
    "unknown runPolicy field": (
        lambda j: j["spec"]["runPolicy"].update(cleanPodPolicies="All"),
        ["spec.runPolicy: Additional properties are not allowed ('cleanPodPolicies' was unexpected)"],
    ),
    "unknown spec field": (
        lambda j: j["spec"].update(nprocPerNodes="8"),
        ["spec: Additional properties are not allowed ('nprocPerNodes' was unexpected)"],
    ),
    "wrong type": (
        lambda j: j["spec"]["runPolicy"].update(backoffLimit="3"),
        ["spec.runPolicy.backoffLimit: '3' is not of type 'integer'"],
    ),
}
# Caught ONLY by the project's copy of the operator's admission-webhook rules (docev.k8s.admission.admission_errors):
# the CRD schema accepts these, so they are as right as that copy of the rules.
WEBHOOK_ONLY_CASES = {
    "bad replica type": (
        lambda j: _replicas(j).update(Chief=_replicas(j)["Master"]),
        ["replica type 'Chief' is not Master or Worker"],
    ),
    "two masters": (lambda j: _replicas(j)["Master"].update(replicas=2), ["Master.replicas must be 1"]),
    "container renamed": (lambda j: container(j).update(name="trainer"), ["Master: no container named 'pytorch'"]),
    "no image": (lambda j: container(j).pop("image"), ["Master: container 'pytorch' has no image"]),
    "bad name": (lambda j: j["metadata"].update(name="1-train"), ["metadata.name '1-train' is not a DNS-1035 label"]),
    "elastic without worker": (
        lambda j: (_replicas(j).pop("Worker"), j["spec"].update(elasticPolicy={"minReplicas": 1})),
        ["elasticPolicy requires a Worker replica spec"],
    ),
    "both nproc fields": (
        lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 8}),
        ["elasticPolicy.nProcPerNode and spec.nprocPerNode must not both be set"],
    ),
}


@pytest.mark.parametrize("what", [*SCHEMA_CASES, *WEBHOOK_ONLY_CASES])
def test_validator_rejects_what_the_operator_would(what):
    job = render(preview())
    assert pytorchjob_errors(job) == [] and "Worker" in _replicas(job)
    webhook_only = what in WEBHOOK_ONLY_CASES
    mutate, errors = (WEBHOOK_ONLY_CASES if webhook_only else SCHEMA_CASES)[what]
    bad = copy.deepcopy(job)
    mutate(bad)
    assert pytorchjob_errors(bad) == errors
    # each case fails for its own reason, and on the side it is labelled with
    assert admission_errors(bad) == (errors if webhook_only else [])
    assert (list(crd_validator().iter_errors(bad)) == []) == webhook_only


def test_job_details():
    cfg = preview()
    job = render(cfg, run_id="run-1", task="train")
    spec = job["spec"]
    assert spec["runPolicy"] == {
        "cleanPodPolicy": "Running",
        "backoffLimit": 3,
        "activeDeadlineSeconds": cfg.train.timeout_seconds,
        "ttlSecondsAfterFinished": 7 * 24 * 3600,
    }
    pod = spec["pytorchReplicaSpecs"]["Master"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == 1000
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["metadata"]["labels"][RUN_ID_LABEL] == "run-1"
    assert job["metadata"]["annotations"][RUN_ID_ANNOTATION] == "run-1"
    c = container(job)
    assert c["name"] == "pytorch" and c["image"] == cfg.train.image
    assert c["resources"]["requests"] == {"cpu": "64", "memory": "1000Gi"}
    # The W&B key only ever comes from the Secret.
    (wandb,) = [e for e in c["env"] if e["name"] == "WANDB_API_KEY"]
    assert wandb == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "docev-wandb", "key": "api-key"}}}
    assert "value" not in wandb
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["data"] == {"name": "data", "mountPath": "/mnt/docev"}
    assert mounts["checkpoints"] == {
        "name": "checkpoints",
        "mountPath": "/mnt/docev/runs/docev-preview/checkpoints",
        "subPath": "runs/docev-preview/checkpoints",
    }
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "docev-data"}
    assert "&id" not in to_yaml(job) and "*id" not in to_yaml(job)


def test_knobs_reach_the_job():
    cfg = preview(
        "kubernetes.wandb_secret=null",
        "kubernetes.checkpoint_pvc=null",
        "train.run_policy.ttl_seconds_after_finished=null",
        "train.run_policy.clean_pod_policy=All",
        "train.resources.gpu_resource=amd.com/gpu",
        "kubernetes.node_selector={}",
        "kubernetes.tolerations=[]",
    )
    job = render(cfg)
    assert pytorchjob_errors(job) == []
    c = container(job)
    assert [e["name"] for e in c["env"]] == ["PYTHONUNBUFFERED", *CUDA_ENV]
    assert c["resources"]["limits"]["amd.com/gpu"] == "8" and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert [m["name"] for m in c["volumeMounts"]] == ["data", "dshm"]
    assert "ttlSecondsAfterFinished" not in job["spec"]["runPolicy"]
    assert job["spec"]["runPolicy"]["cleanPodPolicy"] == "All"
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "nodeSelector" not in pod and "tolerations" not in pod


def test_cpu_job_has_no_gpu_resource():
    cfg = preview("device=cpu", "train.resources.gpu=0", "train.nproc_per_node=2")
    c = container(render(cfg))
    assert set(c["resources"]["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize(
    "overrides,config_path,expected",
    [
        (["output_dir=outputs/run"], ON_PVC, "output_dir: outputs/run is not below kubernetes.mount_path"),
        ([], "configs/docev_preview.yaml", "must be an absolute path"),
        (["train.resources.gpu=0"], ON_PVC, "0 GPUs per node but device is 'cuda'"),
        (["train.nproc_per_node=16"], ON_PVC, "16 ranks per node but only 8 GPUs"),
        (["train.resources.shm_size=2000Gi"], ON_PVC, "exceeds the pod's memory"),
        (["checkpointer.output_dir=/scratch/ckpt"], ON_PVC, "checkpointer.output_dir: /scratch/ckpt is not below"),
    ],
)
def test_cluster_mistakes_are_config_errors(overrides, config_path, expected):
    with pytest.raises(ConfigError, match=expected):
        render(preview(*overrides), config_path=config_path)


def test_volume_mounts_follow_the_checkpointer():
    cfg = preview("checkpointer.output_dir=/mnt/docev/ckpt/preview")
    assert [tuple(m) for m in volume_mounts(cfg)] == [
        ("data", "docev-data", "/mnt/docev", ""),
        ("checkpoints", "docev-checkpoints", "/mnt/docev/ckpt/preview", "ckpt/preview"),
    ]


def test_job_name_is_deterministic_dns1035_and_short():
    run = "7f1c2a9e-3d4b-4c5d-8e6f-0a1b2c3d4e5f"
    name = job_name(run, "train")
    assert name == job_name(run, "train")  # a retried launcher finds its job
    assert name.startswith("docev-train-")
    assert job_name(run, "train") != job_name(run + "x", "train") != job_name(run, "train-2")
    long = job_name(run, "Train Model For The DocEV Preview Fine-Tune (retry 3)!!")
    assert len(long) <= MAX_JOB_NAME
    for n in (name, long, job_name(run, "___")):
        assert pytorchjob_errors(render(preview(), name=n)) == [], n
        assert len(f"{n}-worker-99") <= 63  # the operator's pod/service names stay valid
    with pytest.raises(ValueError, match="DNS-1035"):
        render(preview(), name="Train")
    with pytest.raises(ValueError):
        job_name("", "train")


def test_label_value_fits_kubernetes_rules():
    assert label_value("train") == "train"
    assert label_value("-my task/1.") == "my-task-1"
    assert len(label_value("x" * 100)) == 63


@pytest.mark.parametrize(
    "override,message",
    [
        ("kubernetes.namespace=Docev", "not a valid Kubernetes namespace name"),
        ("kubernetes.pvc=data_pvc", "not a valid Kubernetes object name"),
        ("kubernetes.wandb_secret_key=api key", "not a valid Secret key"),
        ("kubernetes.mount_path=mnt/docev", "must be an absolute path"),
        ("train.resources.memory=64GB", "not a Kubernetes quantity"),
        ("train.resources.cpu=0", "must be positive"),
        ("train.run_policy.clean_pod_policy=Always", "clean_pod_policy"),
        ("train.run_policy.backoff_limit=-1", "backoff_limit"),
        ("kubernetes.tolerations=[{key: a, operator: Exists, value: b}]", "value must be empty"),
        ("kubernetes.tolerations=[{operator: Equal, value: b}]", "needs a key"),
    ],
)
def test_kubernetes_config_fields_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        preview(override)


def test_kubernetes_config_defaults():
    cfg = preview()
    assert cfg.train.run_policy.backoff_limit == 3
    assert cfg.kubernetes.checkpoint_pvc == "docev-checkpoints"
    assert cfg.kubernetes.mount_path == "/mnt/docev"
    assert preview("kubernetes.mount_path=/data/").kubernetes.mount_path == "/data"
    assert preview("train.resources.cpu=8").train.resources.cpu == "8"  # YAML int → quantity string


def test_object_store_credentials_come_from_the_storage_secret_by_name():
    job = render(preview("kubernetes.storage_secret=docev-s3"))
    assert not pytorchjob_errors(job)
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "docev-s3", "key": "access-key-id"}}
    }  # fmt: skip
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "secret-access-key"
    assert "AWS_ACCESS_KEY_ID" not in {e["name"] for e in container(render(preview()))["env"]}


def test_rdma_resources_ipc_lock_and_nccl_env_are_off_by_default_and_reach_every_pod():
    plain = container(render(preview(), overrides=[]))
    assert plain["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert [e["name"] for e in plain["env"] if e["name"].startswith("NCCL_")] == ["NCCL_DEBUG", "NCCL_DEBUG_SUBSYS"]
    assert set(plain["resources"]["limits"]) == {"cpu", "memory", "nvidia.com/gpu"}
    cfg = preview('train.resources.extra={"rdma/ib": 1}', "train.resources.ipc_lock=true",
                  'train.nccl_env={"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"}')  # fmt: skip
    job = render(cfg)
    assert pytorchjob_errors(job) == []  # CRD schema + the core PodTemplate schema
    for rtype in job["spec"]["pytorchReplicaSpecs"]:
        c = container(job, rtype)
        assert c["resources"]["requests"]["rdma/ib"] == c["resources"]["limits"]["rdma/ib"] == "1"
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NCCL_IB_HCA"] == "mlx5" and env["NCCL_SOCKET_IFNAME"] == "eth0"
        assert env["NCCL_DEBUG_SUBSYS"] == "INIT,NET"  # the log names the transport NCCL chose (IB or Socket)
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
        assert env["TORCHINDUCTOR_CACHE_DIR"] == "/mnt/docev/cache/inductor"  # on the volume: kept across restarts
    quiet = container(render(preview('train.nccl_env={"NCCL_DEBUG": "WARN"}', "compile=false")))
    env = {e["name"]: e.get("value") for e in quiet["env"]}
    assert env["NCCL_DEBUG"] == "WARN" and "NCCL_DEBUG_SUBSYS" not in env and "TRITON_CACHE_DIR" not in env


@pytest.mark.parametrize(
    "override,message",
    [
        ('train.resources.extra={"ib": "1"}', "not an extended resource name"),
        ('train.resources.extra={"foo.kubernetes.io/x": "1"}', "kubernetes.io resources are not extended"),
        ('train.resources.extra={"rdma/ib": "0"}', "must be positive"),
        ('train.resources.extra={"nvidia.com/gpu": "8"}', "set it with gpu"),
        ('train.nccl_env={"LD_PRELOAD": "x"}', "only NCCL_"),
    ],
)
def test_device_resources_and_nccl_env_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        preview(override)
