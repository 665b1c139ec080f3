"""A process that saves adapter step folders, killed by test_peft_checkpoint while it writes one.

    python adapter_save_worker.py CONFIG.json MARKER

Saves ``step_2`` whole, then ``step_4`` with its tensor file cut to half its bytes (what a kill during the
write leaves), writes its pid to MARKER and sleeps: the test kills it there with SIGKILL, so no ``except``
or ``finally`` of the save runs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

import docev.models.docev._checkpointer as checkpointer_module
from docev.config import DocEVConfig, load_config
from docev.models.docev import DocEVCheckpointer
from docev.training.peft import PeftRun

KEY = "decoder.layers.0.attn.q_proj.lora_b.weight"


def save(cfg: DocEVConfig, step: int, value: float) -> Path:
    """Step folder ``step`` of an adapter run whose one trained tensor is filled with ``value``."""
    run = PeftRun.from_config(cfg)
    ckpt = DocEVCheckpointer(cfg.checkpointer.checkpoint_dir, output_dir=cfg.checkpointer.output_dir)
    trained = {KEY: torch.full((128, 8), value)}
    return ckpt.save_trained_checkpoint({"model": trained, "global_step": step}, step, run.metadata())


def main(config: str, marker: str) -> None:
    cfg = load_config(config)
    save(cfg, 2, 1.0)
    real_save_file = checkpointer_module.save_file

    def half_written(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        Path(marker + ".tmp").write_text(str(os.getpid()))
        os.replace(marker + ".tmp", marker)  # the test reads a complete pid
        time.sleep(300)

    checkpointer_module.save_file = half_written
    save(cfg, 4, 2.0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
