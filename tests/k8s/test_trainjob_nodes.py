"""The rendered TrainJob's command, started the way Trainer's torch plugin starts its nodes: one process per
node with the plugin's PET_* variables (and the pod's env), 2 nodes on 127.0.0.1, the tiny model on CPU/gloo.
It trains and checkpoints. The pod is the one Trainer would build from our runtime and TrainJob
(docev.k8s.admission.effective_pod); only the master address is 127.0.0.1 and the port a free one, instead of the
node-0 pod's DNS name and 29500."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS

from docev.config import load_config
from docev.data.preprocess import run_preprocess
from docev.k8s.admission import effective_pod, trainjob_errors
from docev.k8s.trainjob import render_runtime, render_trainjob
from docev.models.docev import DocEVCheckpointer
from docev.run.checkpoints import latest_checkpoint
from docev.training.metrics_log import read_metrics
from docev.validate.runner import run_validate

pytestmark = pytest.mark.slow  # ~1 min of torchrun on 2 cores, more on a shared machine
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_trainjob_nodes_train_and_checkpoint(tmp_path, tiny_checkpoint, synth_sources):
    volume = tmp_path / "volume"  # plays the data volume at kubernetes.mount_path
    config_file = volume / "configs" / "tiny.yaml"
    config_file.parent.mkdir(parents=True)
    shutil.copy(CONFIGS / "tiny.yaml", config_file)
    out = volume / "runs" / "tiny"
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    overrides = [
        f"output_dir={out}", f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
        f"datasets={json.dumps(datasets)}", f"kubernetes.mount_path={volume}", "kubernetes.checkpoint_pvc=null",
        "kubernetes.wandb_secret=null", "train.resources.shm_size=2Gi", "train.nnodes=2", "train.nproc_per_node=1",
        "epochs=1", f"max_steps_per_epoch={STEPS}", f"save_every_n_steps={STEPS}", "preprocess.workers=1",
    ]  # fmt: skip
    cfg = load_config(config_file, overrides)
    run_validate(cfg, workers=1)  # the pipeline's steps before train
    run_preprocess(cfg, workers=1)

    runtime = render_runtime(cfg)
    job = render_trainjob(cfg, name="docev-train", config_path=str(config_file), overrides=overrides)
    assert trainjob_errors(job, runtime) == []
    nodes = job["spec"]["trainer"]["numNodes"]
    assert nodes == 2
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    base.pop("RANK", None)
    bin_dir = Path(sys.executable).parent  # the image has `docev` on PATH; here it is the venv's
    base["PATH"] = f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"
    procs = []
    for rank in range(nodes):
        (container,) = effective_pod(runtime, job, rank=rank)["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}  # no valueFrom: the W&B Secret is off here
        assert env["PET_NODE_RANK"] == str(rank) and env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "1"
        env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port)
        log = (tmp_path / f"node-{rank}.log").open("w")
        procs.append((subprocess.Popen(container["command"], env={**base, **env}, cwd=tmp_path, stdout=log,
                                       stderr=subprocess.STDOUT), log))  # fmt: skip
    try:
        codes = [p.wait(timeout=600) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = {rank: (tmp_path / f"node-{rank}.log").read_text() for rank in range(nodes)}
    assert codes == [0, 0], "\n".join(f"--- node {r}\n{text[-4000:]}" for r, text in logs.items())

    rows = read_metrics(out / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    state = DocEVCheckpointer(latest_checkpoint(out / "checkpoints")).load_checkpoint()
    # One rank per node, two nodes: the checkpoint is of a 2-rank world at the last step.
    assert state["global_step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
