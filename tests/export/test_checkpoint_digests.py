"""Checkpoint digests on a sealed HF step folder: every reader (export, evaluate, generate, ``docev checkpoint
verify``) refuses a corrupt step naming the file; pruning keeps a sealed fallback; the recipe state is checked
against the manifest. The recipe's own resume and fallback are tested in tests/training/test_recipe.py."""

import json
import shutil
from pathlib import Path

import pytest

from docev.cli import main
from docev.evaluation.evaluate import evaluate
from docev.export import ExportError, export_checkpoint
from docev.inference import DocEVGenerator
from docev.run.checkpoints import CheckpointError, prune_checkpoints
from docev.run.digests import MANIFEST, CheckpointCorrupt, read_manifest, verify_checkpoint
from docev.training.state import recipe_problems

from .conftest import make_config


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def corrupt(export_run, tmp_path) -> Path:
    """A copy of the sealed step_8 under its own checkpoints folder, one bit of a weight shard flipped."""
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(export_run / "checkpoints", ckpts)
    folder = ckpts / "step_8"
    _flip(next(folder.glob("model-*.safetensors")))
    return folder


def test_the_save_seals_every_file(step_checkpoint):
    manifest = verify_checkpoint(step_checkpoint)
    assert manifest["step"] == 8 and manifest["hash"] == "xxh3_128"
    on_disk = sorted(p.name for p in step_checkpoint.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk and "recipe_state.pt" in on_disk
    assert not any(p.name.startswith(".digest.") for p in step_checkpoint.iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_every_file_of_a_step_is_checked(step_checkpoint, tmp_path, damage):
    folder = tmp_path / "step_8"
    shutil.copytree(step_checkpoint, folder)
    for path in sorted(p for p in folder.iterdir() if p.name != MANIFEST):
        original = path.read_bytes()
        if damage == "flip":
            _flip(path)
            expected = f"{path.name}: xxh3_128 .* differs from the manifest's .* \\(same size, changed bytes\\)"
        else:
            path.write_bytes(original[: len(original) // 2])
            expected = f"{path.name}: {len(original) // 2} bytes, the manifest says {len(original)}"
        with pytest.raises(CheckpointCorrupt, match=f"checkpoint {folder} does not verify: {expected}"):
            verify_checkpoint(folder)
        path.write_bytes(original)
    verify_checkpoint(folder)


def test_readers_refuse_a_corrupt_step_naming_the_file(export_run, tiny_checkpoint, synth_sources, corrupt, capsys):
    shard = next(corrupt.glob("model-*.safetensors")).name
    cfg = make_config(export_run, tiny_checkpoint, synth_sources, f"checkpointer.output_dir={corrupt.parent}")
    with pytest.raises(ExportError, match=f"checkpoint {corrupt} does not verify: {shard}: xxh3_128"):
        export_checkpoint(cfg, "latest", str(corrupt.parent.parent / "export"))
    assert not (corrupt.parent.parent / "export").exists()
    with pytest.raises(CheckpointError, match=f"{corrupt} does not verify: {shard}"):
        evaluate(cfg, checkpoint="step_8")
    with pytest.raises(CheckpointCorrupt, match=f"{corrupt} does not verify: {shard}"):
        DocEVGenerator(corrupt)
    assert main(["checkpoint", "verify", str(corrupt)]) == 1
    assert f"{corrupt} does not verify: {shard}" in capsys.readouterr().err
    assert main(["checkpoint", "verify", str(export_run / "checkpoints" / "step_8")]) == 0
    assert "step 8, " in capsys.readouterr().out


def test_recipe_state_is_checked_against_the_manifest(step_checkpoint):
    manifest = {**read_manifest(step_checkpoint), "recipe": {"global_step": 8, "world_size": 2,
                                                            "sampler": {"epoch": 0, "step": 6, "seed": 0}}}  # fmt: skip
    state = {"global_step": 8, "world_size": 2, "rng": [{}, {}], "sampler": {"epoch": 0, "step": 6, "seed": 0}}
    assert recipe_problems(step_checkpoint, state, manifest) == []
    replayed = {**state, "sampler": {"epoch": 0, "step": 4, "seed": 0}}  # a flipped bit: two steps replayed
    assert recipe_problems(step_checkpoint, replayed, manifest) == [
        "recipe_state.pt: sampler is {'epoch': 0, 'step': 4, 'seed': 0}, the manifest recorded "
        "{'epoch': 0, 'step': 6, 'seed': 0}"
    ]
    assert recipe_problems(step_checkpoint, {**state, "global_step": 6, "rng": [{}]}, None) == [
        "recipe_state.pt: global_step is 6, the folder is step_8",
        "recipe_state.pt: 1 RNG states for world_size 2",
    ]


def test_pruning_keeps_a_sealed_checkpoint_besides_the_newest(tmp_path):
    out = tmp_path / "checkpoints"
    for step, sealed in ((2, True), (4, True), (6, False), (8, True)):
        folder = out / f"step_{step}"
        folder.mkdir(parents=True)
        if sealed:
            (folder / MANIFEST).write_text(json.dumps({"format": "docev-checkpoint", "files": {}}))
    (out / "latest").write_text("step_8\n")
    removed = prune_checkpoints(out, keep=1)
    assert [p.name for p in removed] == ["step_2", "step_6"]  # step_4: the newest sealed one before latest
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_4", "step_8"]
