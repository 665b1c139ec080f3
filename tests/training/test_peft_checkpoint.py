"""Adapter step folders: a save that dies leaves ``latest`` on the previous whole folder, which a resumed run
reads over the base; settings that differ are refused (``true``) or skipped (``auto``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from adapter_save_worker import KEY, save
from conftest import tiny_config

from docev.models.docev import DocEVCheckpointer
from docev.models.docev._folder import PEFT_META, TRAINED_FILE
from docev.models.docev._peft import PeftCheckpointError
from docev.run.checkpoints import latest_checkpoint, prune_checkpoints, start_folder
from docev.training.peft import PeftRun

WORKER = Path(__file__).with_name("adapter_save_worker.py")
LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _cfg(tmp_path, tiny_checkpoint, *extra):
    return tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], *LORA, *extra)


def test_a_save_killed_midway_keeps_the_previous_folder(tmp_path, tiny_checkpoint):
    """A real process (adapter_save_worker.py) SIGKILLed with ``step_4``'s tensors half written: no cleanup of
    the save runs, ``latest`` stays on ``step_2``, the partial folder is pruned and a resume reads step 2."""
    cfg = _cfg(tmp_path, tiny_checkpoint)
    out = cfg.checkpointer.output_dir
    config, marker = tmp_path / "config.json", tmp_path / "writing"
    config.write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, str(WORKER), str(config), str(marker)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the worker never reached the write"
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()
    partial = tmp_path / "checkpoints" / ".step_4.partial"
    assert (partial / TRAINED_FILE).stat().st_size > 0 and not (partial / PEFT_META).exists()  # killed mid-write
    assert latest_checkpoint(out).name == "step_2"
    assert [p.name for p in prune_checkpoints(out, 2)] == [".step_4.partial"]

    run = PeftRun.from_config(cfg)
    folder, resumed = run.start_folder(*start_folder(cfg.checkpointer.checkpoint_dir, out, "auto"), "auto")
    assert resumed and folder.name == "step_2"
    base = DocEVCheckpointer(cfg.checkpointer.checkpoint_dir)
    state = run.load(base, folder)
    assert state["global_step"] == 2
    assert torch.equal(state["model"][KEY], torch.full((128, 8), 1.0))
    assert "decoder.layers.0.attn.q_proj.weight" in state["model"]  # the base under the trained tensors


def test_other_adapter_settings_are_refused_or_skipped(tmp_path, tiny_checkpoint):
    save(_cfg(tmp_path, tiny_checkpoint), 2, 1.0)
    other = PeftRun.from_config(_cfg(tmp_path, tiny_checkpoint, "model.lora_rank=4"))
    out = tmp_path / "checkpoints"
    folder, resumed = start_folder(tiny_checkpoint, out, "auto")
    assert other.start_folder(folder, resumed, "auto") == (other.base_dir, False)
    assert other.start_folder(folder, resumed, True) == (folder, True)
    with pytest.raises(PeftCheckpointError, match="rank: checkpoint 8, config 4"):
        other.load(DocEVCheckpointer(tiny_checkpoint), folder)
    meta = json.loads((folder / "peft.json").read_text())
    assert meta["base"]["config.json"] and meta["spec"]["targets"] == ["q_proj", "v_proj"]
