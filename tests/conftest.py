"""Shared fixtures: the tiny checkpoint and a small synthetic corpus, made once per session."""

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
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


CHATS = [
    ("What is the capital of France?", "Paris."),
    ("Name a prime number.", "Seven."),
    ("Spell 'cat' backwards.", "tac"),
    ("What colour is a clear sky?", "Blue."),
    ("How many legs has a spider?", "Eight."),
    ("What is two plus two?", "Four."),
    ("Which is larger, 7 or 9?", "Nine."),
    ("Say hello.", "Hello!"),
]


@pytest.fixture(scope="session")
def train_data(tmp_path_factory, tiny_checkpoint, synth_sources) -> dict:
    """Validated + preprocessed shards of the synthetic pages plus a text-only chat source, made once per session
    for the recipe's runs (tests/training/test_recipe.py, test_peft.py): each run links them into its own folder.
    ``root``: where runs make their folders; ``base``: the output folder holding validate/ and shards/."""
    import json

    from docev.data.preprocess import run_preprocess
    from docev.validate.runner import run_validate

    root = tmp_path_factory.mktemp("train")
    text = root / "text"
    text.mkdir()
    with (text / "chat.jsonl").open("w") as f:
        for i, (q, a) in enumerate(CHATS):
            context = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"id": f"txt-{i}", "context": context, "image_files": []}) + "\n")
    datasets = [
        {"source": str(synth_sources["instruct"]), "name": "instruct"},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
         "context_col": "text", "weight": 0.25},
        {"source": str(text), "name": "text"},
    ]  # fmt: skip
    base = root / "base"
    cfg = tiny_config(base, tiny_checkpoint, datasets)
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    return {"root": root, "base": base, "datasets": datasets, "checkpoint": tiny_checkpoint, "cfg": cfg}


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


def one_process_group(monkeypatch) -> None:
    """The env of a one-process torch.distributed group of the test's own (``recipe.main`` in this interpreter);
    ``monkeypatch`` restores it afterwards."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's ``size=`` option) mounted on a new ``folder``, unmounted afterwards: a real
    full disk for the disk-full tests. Skips the test where mounting is not allowed (not root)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): the disk-full test did not run")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
