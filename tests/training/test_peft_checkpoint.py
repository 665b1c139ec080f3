"""Adapter step folders: a save that dies leaves ``latest`` on the previous whole folder, which a resumed run
reads over the base; settings that differ are refused (``true``) or skipped (``auto``)."""

import json

import pytest
import torch
from conftest import tiny_config

import docev.models.docev._checkpointer as checkpointer_module
from docev.models.docev import DocEVCheckpointer
from docev.models.docev._peft import PeftCheckpointError
from docev.run.checkpoints import latest_checkpoint, prune_checkpoints, start_folder
from docev.training.peft import PeftRun

LORA = ["model._component_=docev.models.docev.lora_docev_tiny", "model.decoder_trainable=false"]


def _cfg(tmp_path, tiny_checkpoint, *extra):
    return tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], *LORA, *extra)


def _save(cfg, step, value):
    run = PeftRun.from_config(cfg)
    ckpt = DocEVCheckpointer(cfg.checkpointer.checkpoint_dir, output_dir=cfg.checkpointer.output_dir)
    trained = {"decoder.layers.0.attn.q_proj.lora_b.weight": torch.full((128, 8), value)}
    return ckpt.save_trained_checkpoint({"model": trained, "global_step": step}, step, run.metadata())


def test_a_save_killed_midway_keeps_the_previous_folder(tmp_path, tiny_checkpoint, monkeypatch):
    cfg = _cfg(tmp_path, tiny_checkpoint)
    out = cfg.checkpointer.output_dir
    _save(cfg, 2, 1.0)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the tensors")

    monkeypatch.setattr(checkpointer_module, "save_file", die)
    with pytest.raises(KeyboardInterrupt):
        _save(cfg, 4, 2.0)
    assert latest_checkpoint(out).name == "step_2" and (tmp_path / "checkpoints" / ".step_4.partial").is_dir()
    assert [p.name for p in prune_checkpoints(out, 2)] == [".step_4.partial"]

    run = PeftRun.from_config(cfg)
    folder, resumed = run.start_folder(*start_folder(cfg.checkpointer.checkpoint_dir, out, "auto"), "auto")
    assert resumed and folder.name == "step_2"
    base = DocEVCheckpointer(cfg.checkpointer.checkpoint_dir)
    state = run.load(base, folder)
    assert state["global_step"] == 2
    assert torch.equal(state["model"]["decoder.layers.0.attn.q_proj.lora_b.weight"], torch.full((128, 8), 1.0))
    assert "decoder.layers.0.attn.q_proj.weight" in state["model"]  # the base under the trained tensors


def test_other_adapter_settings_are_refused_or_skipped(tmp_path, tiny_checkpoint):
    _save(_cfg(tmp_path, tiny_checkpoint), 2, 1.0)
    other = PeftRun.from_config(_cfg(tmp_path, tiny_checkpoint, "model.lora_rank=4"))
    out = tmp_path / "checkpoints"
    folder, resumed = start_folder(tiny_checkpoint, out, "auto")
    assert other.start_folder(folder, resumed, "auto") == (other.base_dir, False)
    assert other.start_folder(folder, resumed, True) == (folder, True)
    with pytest.raises(PeftCheckpointError, match="rank: checkpoint 8, config 4"):
        other.load(DocEVCheckpointer(tiny_checkpoint), folder)
    meta = json.loads((folder / "peft.json").read_text())
    assert meta["base"]["config.json"] and meta["spec"]["targets"] == ["q_proj", "v_proj"]
