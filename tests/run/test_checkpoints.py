import random

import numpy as np
import pytest
import torch

from docev.run.checkpoints import ResumeError, latest_checkpoint, prune_checkpoints, start_folder
from docev.training.state import capture_rng, restore_rng


def _folders(out, steps, latest, recipe=True):
    for s in steps:
        (out / f"step_{s}").mkdir(parents=True)
        if recipe:
            (out / f"step_{s}" / "recipe_state.pt").write_bytes(b"")
    (out / "latest").write_text(f"step_{latest}\n")


def test_start_folder(tmp_path):
    base, out = tmp_path / "base", tmp_path / "ckpts"
    assert start_folder(base, out, False) == (base, False)
    assert start_folder(base, out, "auto") == (base, False)
    with pytest.raises(ResumeError, match="latest does not exist"):
        start_folder(base, out, True)
    _folders(out, [2, 4], 4)
    for resume in (True, "auto"):
        assert start_folder(base, out, resume) == (out / "step_4", True)
    assert start_folder(base, out, False) == (base, False)
    (out / "step_4" / "recipe_state.pt").unlink()
    with pytest.raises(ResumeError, match="step_4 has no recipe_state.pt"):
        start_folder(base, out, "auto")


def test_prune_keeps_the_last_k_up_to_latest(tmp_path):
    out = tmp_path
    _folders(out, [2, 4, 6, 8, 10], 8)  # step_10: renamed into place, `latest` never moved (killed)
    (out / ".step_12.partial").mkdir()  # killed while writing
    (out / ".latest.tmp").write_text("step_12\n")
    removed = prune_checkpoints(out, keep=2, protect=out / "step_2")
    assert [p.name for p in removed] == [".latest.tmp", ".step_12.partial", "step_10", "step_4"]
    assert sorted(p.name for p in out.iterdir()) == ["latest", "step_2", "step_6", "step_8"]
    assert prune_checkpoints(out, keep=1) == [out / "step_2", out / "step_6"]
    assert latest_checkpoint(out) == out / "step_8"
    assert prune_checkpoints(tmp_path / "none", keep=1) == []


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


def test_best_pointer_survives_pruning(tmp_path):
    from docev.run.checkpoints import read_best, write_best

    out = tmp_path
    _folders(out, [2, 4, 6, 8], 8)
    assert read_best(out) is None
    write_best(out, out / "step_2", 1.25)
    best = read_best(out)
    assert (best.folder, best.step, best.eval_loss) == (out / "step_2", 2, 1.25)
    removed = prune_checkpoints(out, keep=2)
    assert [p.name for p in removed] == ["step_4"] and (out / "step_2").is_dir()
    write_best(out, out / "step_8", 1.0)  # the pointer moves: step_2 is an ordinary old folder again
    assert [p.name for p in prune_checkpoints(out, keep=2)] == ["step_2"]
    import shutil

    shutil.rmtree(out / "step_8")
    with pytest.raises(FileNotFoundError, match="best names step_8"):
        read_best(out)


def test_resolve_best(tmp_path, tiny_checkpoint):
    from conftest import tiny_config

    from docev.run.checkpoints import CheckpointError, resolve_checkpoint, write_best
    from docev.run.digests import seal

    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}])
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match="--checkpoint best: no checkpoint under"):
        resolve_checkpoint(cfg, "best")
    _folders(root, [3], 3)
    (root / "step_3" / "config.json").write_text("{}")
    seal(root / "step_3", 3)  # a step folder is resolved only with its digests
    write_best(root, root / "step_3", 0.5)
    assert resolve_checkpoint(cfg, "best") == root / "step_3" == resolve_checkpoint(cfg, "latest")


def test_one_checkpoint_folder_default(tmp_path, tiny_checkpoint):
    """Without checkpointer.output_dir, training, the pod spec and --checkpoint all use work_dir/checkpoints."""
    from conftest import tiny_config

    from docev.k8s.pod import volume_mounts
    from docev.run.checkpoints import resolve_checkpoint
    from docev.run.digests import seal
    from docev.run.paths import run_paths

    over = ["checkpointer.output_dir=null", f"work_dir={tmp_path / 'work'}", "kubernetes.checkpoint_pvc=ckpt",
            f"kubernetes.mount_path={tmp_path}"]  # fmt: skip
    cfg = tiny_config(tmp_path, tiny_checkpoint, [{"source": str(tmp_path)}], *over)
    root = tmp_path / "work" / "checkpoints"
    assert cfg.checkpointer.output_dir is None and run_paths(cfg).checkpoints == root
    assert volume_mounts(cfg)[-1].mount_path == str(root)
    _folders(root, [2, 4], 4)
    (root / "step_4" / "config.json").write_text("{}")
    seal(root / "step_4", 4)
    assert resolve_checkpoint(cfg, "latest") == root / "step_4"
