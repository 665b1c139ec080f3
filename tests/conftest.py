"""Shared fixtures: the tiny checkpoint and a small synthetic corpus, made once per session."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from docev.assets import init_checkpoint

    return init_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def synth_sources(tmp_path_factory) -> dict[str, Path]:
    from docev.synth import synth_data

    return synth_data(tmp_path_factory.mktemp("synth"), 20, seed=3, fmt="jsonl", workers=1)


def tiny_config(output_dir: Path, checkpoint: Path, datasets: list[dict] | None = None, *overrides: str):
    """configs/tiny.yaml pointed at a test's folders (no synthetic section: the test brings its data)."""
    import json

    from docev.config import load_config

    args = [f"output_dir={output_dir}", f"tokenizer.model_name_or_path={checkpoint}", "synthetic=null", "epochs=1"]
    if datasets is not None:
        args.append(f"datasets={json.dumps(datasets)}")
    return load_config(CONFIGS / "tiny.yaml", [*args, *overrides])


TRAINABLE_PREFIXES = ("decoder.", "tok_embeddings.", "connector.", "image_newline")


def perturb(state: dict, seed: int = 1, scale: float = 0.1) -> dict:
    """What training would change: the decoder and fusion groups (the config's defaults), never the encoder."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) * scale if k.startswith(TRAINABLE_PREFIXES) else v
        for k, v in state.items()
    }


def write_adapter_step(cfg, step: int = 8, seed: int = 5) -> tuple[dict, dict]:
    """``step_{step}`` of an adapter run under ``cfg``'s checkpointer, as the recipe saves it (trained tensors +
    ``peft.json``, ``latest`` moved), with random adapters (``lora_b`` non-zero, so they change the model) and
    trained groups. Returns (trained tensors, the base's torchtune state). Cheap: no training."""
    import torch

    from docev.models.docev import DocEVCheckpointer, lora_docev_tiny
    from docev.training.peft import PeftRun, trained_keys

    built = lora_docev_tiny(**cfg.model.lora_args())
    base = DocEVCheckpointer(cfg.checkpointer.checkpoint_dir, output_dir=cfg.checkpointer.output_dir)
    state = base.load_checkpoint()["model"]
    gen = torch.Generator().manual_seed(seed)
    shapes = built.state_dict()
    trained = {}
    for key in trained_keys(built):
        if key in state:
            trained[key] = state[key] + 0.1 * torch.randn(state[key].shape, generator=gen)
        elif key.endswith(".magnitude"):
            trained[key] = 0.5 + torch.rand(shapes[key].shape, generator=gen)
        else:
            trained[key] = 0.2 * torch.randn(shapes[key].shape, generator=gen)
    base.save_trained_checkpoint({"model": trained, "global_step": step}, step, PeftRun.from_config(cfg).metadata())
    return trained, state
