import json

from torchtune.training.metric_logging import DiskLogger

from docev.training.metrics_log import MetricsLog, read_metrics, wandb_mode

WANDB = "torchtune.training.metric_logging.WandBLogger"


def test_wandb_mode():
    env = {}
    assert wandb_mode(WANDB, env) == "offline" and env == {"WANDB_MODE": "offline"}
    env = {"WANDB_API_KEY": "k"}
    assert wandb_mode(WANDB, env) == "online"
    env = {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}
    assert wandb_mode(WANDB, env) == "disabled"
    env = {}
    assert wandb_mode("torchtune.training.metric_logging.DiskLogger", env) is None and env == {}


def test_metrics_log_writes_jsonl_and_the_configured_logger(tmp_path):
    disk = DiskLogger(log_dir=str(tmp_path / "disk"), filename="disk.txt")
    log = MetricsLog(tmp_path / "logs" / "metrics.jsonl", tmp_path / "logs" / "loss.png", disk)
    for step in (1, 2, 3):
        log.log({"loss": 4.0 - step, "lr": 0.1 * step}, step=step)
    log.close()
    rows = read_metrics(tmp_path / "logs" / "metrics.jsonl")
    assert rows == [{"step": s, "loss": 4.0 - s, "lr": 0.1 * s} for s in (1, 2, 3)]
    assert "Step 3 | loss:1.0" in (tmp_path / "disk" / "disk.txt").read_text()

    resumed = MetricsLog(tmp_path / "logs" / "metrics.jsonl", tmp_path / "logs" / "loss.png")
    assert resumed.truncate_after(1) == 2  # a run resumed from step 1 logs steps 2.. again
    resumed.log({"loss": 2.5, "lr": 0.2}, step=2)
    assert [r["step"] for r in read_metrics(resumed.path)] == [1, 2]
    assert json.loads(resumed.path.read_text().splitlines()[-1])["loss"] == 2.5
    png = resumed.plot()
    assert png == tmp_path / "logs" / "loss.png" and png.read_bytes()[:4] == b"\x89PNG"
    resumed.close()
    assert MetricsLog(tmp_path / "empty" / "metrics.jsonl", tmp_path / "empty" / "loss.png").plot() is None
