"""The compiled IR: parameters, platform spec, caching, retries, secrets — and the committed YAML is fresh."""

import json
import os

import pytest
import yaml
from conftest import CONFIGS, ROOT

from pipelines.compile import compile_pipeline, main

PREVIEW = CONFIGS / "docev_preview.yaml"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "p.yaml"
    old = os.environ.get("WANDB_API_KEY")
    os.environ["WANDB_API_KEY"] = "wandb-secret-value-1234"  # a key in the environment must never reach the IR
    try:
        compile_pipeline(PREVIEW, out)
    finally:
        os.environ.pop("WANDB_API_KEY") if old is None else os.environ.__setitem__("WANDB_API_KEY", old)
    text = out.read_text()
    ir, platform = yaml.safe_load_all(text)
    return text, ir, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_what_compile_produces():
    assert main(["--check"]) == 0, "pipelines/docev_finetune.yaml is stale: run python pipelines/compile.py"
    assert (ROOT / "pipelines" / "docev_finetune.yaml").is_file()


def test_run_parameters(compiled):
    _, ir, _ = compiled
    params = ir["root"]["inputDefinitions"]["parameters"]
    assert {k: v["parameterType"] for k, v in params.items()} == {
        "config_json": "STRING", "learning_rate": "NUMBER_DOUBLE", "epochs": "NUMBER_INTEGER",
        "max_steps_per_epoch": "NUMBER_INTEGER", "num_nodes": "NUMBER_INTEGER", "gpus_per_node": "NUMBER_INTEGER",
        "resume": "STRING", "eval_every_n_steps": "NUMBER_INTEGER", "lora_rank": "NUMBER_INTEGER",
    }  # fmt: skip
    embedded = json.loads(params["config_json"]["defaultValue"])
    assert embedded["tokenizer"]["tile_size"] == 560 and embedded["output_dir"] == "/mnt/docev/runs/docev-preview"
    assert params["learning_rate"]["defaultValue"] == 1e-5
    assert params["num_nodes"]["defaultValue"] == 2 and params["gpus_per_node"]["defaultValue"] == 8
    assert params["resume"]["defaultValue"] == "auto" and params["max_steps_per_epoch"]["defaultValue"] == 0
    assert params["eval_every_n_steps"]["defaultValue"] == 0
    assert params["lora_rank"]["defaultValue"] == 0  # a full fine-tune: no rank


def test_every_step_mounts_the_volume_uncached(compiled):
    _, ir, executors = compiled
    tasks = ir["root"]["dag"]["tasks"]
    steps = [n for n in tasks if not n.startswith("for-loop")]
    assert set(steps) == {"resolve-config", "validate-merge", "preprocess-merge", "train", "evaluate", "evaluate-2",
                          "export"}  # fmt: skip
    for name in steps:
        assert tasks[name]["cachingOptions"] == {}, name  # KFP's cache key ignores volumes: never cache
    for name, ex in executors.items():
        claims = {m["constant"]: m for m in ex["pvcMount"]}
        assert claims["docev-data"]["mountPath"] == "/mnt/docev", name
        assert claims["docev-checkpoints"]["subPath"] == "runs/docev-preview/checkpoints", name
        assert ex["securityContext"]["runAsNonRoot"] is True
    for name in ("preprocess-merge", "export"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["train"]  # train retries by resuming from `latest` inside the job
    # deterministic verdicts are not retried: the first task's preflight, validate's reject policy
    assert "retryPolicy" not in tasks["resolve-config"] and "retryPolicy" not in tasks["validate-merge"]


def test_train_gets_the_secret_by_reference_and_the_cluster_does_the_gpus(compiled):
    text, ir, executors = compiled
    train = executors["exec-train"]
    assert train["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "WANDB_API_KEY", "secretKey": "api-key"}]
    assert train["secretAsEnv"][0]["secretNameParameter"]["runtimeValue"]["constant"] == "docev-wandb"
    assert "wandb-secret-value-1234" not in text
    # backend kubernetes: the train task only launches a PyTorchJob, the GPUs/node selector go to the job
    container = ir["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert "resources" not in container and "nodeSelector" not in train
    assert executors["exec-preprocess-shard"]["emptyDirMounts"][0]["medium"] == "Memory"
    # CPU/memory of the data and export tasks come from kubernetes.step_resources
    res = ir["deploymentSpec"]["executors"]["exec-preprocess-shard"]["container"]["resources"]
    assert res["cpuLimit"] == 16.0 and res["memoryLimit"] == 68.719476736  # 64Gi in GB
    assert ir["deploymentSpec"]["executors"]["exec-export"]["container"]["resources"]["cpuLimit"] == 8.0
    # evaluation generates in one process: one GPU of the training node type, beside the running training
    ev = ir["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]
    assert ev["accelerator"]["resourceCount"] == "1" and executors["exec-evaluate"]["nodeSelector"]["labels"]
    assert "train" not in ir["root"]["dag"]["tasks"]["evaluate"].get("dependentTasks", [])


def test_local_backend_schedules_the_train_task_itself(tmp_path):
    out = compile_pipeline(PREVIEW, tmp_path / "p.yaml", ["train.backend=local", "train.nnodes=1"])
    ir, platform = yaml.safe_load_all(out.read_text())
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    res = ir["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceCount"] == "8" and res["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert res["memoryLimit"] == 1073.741824  # 1000Gi in GB, as KFP writes it
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu" and train["emptyDirMounts"][0]["sizeLimit"] == "64Gi"


def test_trainjob_backend_compiles_with_the_launcher_task(tmp_path):
    """train.backend: trainjob compiles like kubernetes: the task only launches (GPUs, node selector, /dev/shm
    go to the TrainJob's runtime and pods), keeps the W&B Secret by reference, and the config says trainjob."""
    out = compile_pipeline(PREVIEW, tmp_path / "p.yaml", ["train.backend=trainjob"])
    ir, platform = yaml.safe_load_all(out.read_text())
    train = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert "resources" not in ir["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert "nodeSelector" not in train and "tolerations" not in train and "emptyDirMounts" not in train
    assert train["secretAsEnv"][0]["secretNameParameter"]["runtimeValue"]["constant"] == "docev-wandb"
    assert {m["constant"] for m in train["pvcMount"]} == {"docev-data", "docev-checkpoints"}
    embedded = json.loads(ir["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert embedded["train"]["backend"] == "trainjob" and embedded["train"]["runtime"] == "docev-torch-distributed"


def test_fanout_is_a_parallel_for(tmp_path):
    out = compile_pipeline(PREVIEW, tmp_path / "p.yaml", ["validate.fanout=4", "preprocess.fanout=3"])
    ir, _ = yaml.safe_load_all(out.read_text())
    loops = {n: t for n, t in ir["root"]["dag"]["tasks"].items() if n.startswith("for-loop")}
    items = sorted(len(json.loads(t["parameterIterator"]["items"]["raw"])) for t in loops.values())
    assert items == [3, 4]


def test_config_errors_exit_2(capsys):
    assert main(["--config", str(PREVIEW), "--out", "/dev/null", "optimizer.lrr=1"]) == 2
    assert "optimizer.lrr: unknown argument" in capsys.readouterr().err
