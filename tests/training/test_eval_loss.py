"""Eval loss: equals a per-sample hand computation; rank shares partition the eval samples."""

import pytest
import torch
from conftest import tiny_config
from torchtune.modules.loss import CEWithChunkedOutputLoss

from docev.data.dataset import ShardDataset
from docev.data.loader import build_collate
from docev.data.preprocess import run_preprocess, shards_dir
from docev.eval_loss import EvalLoss
from docev.models.docev import DocEVCheckpointer, docev_tiny
from docev.validate.runner import run_validate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, tiny_checkpoint, synth_sources):
    data = [
        {"source": str(synth_sources["instruct"]), "name": "instruct", "eval_fraction": 0.3},
        {"source": str(synth_sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
         "context_col": "text", "eval_fraction": 0.5},
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("evalloss")
    cfg = tiny_config(out, tiny_checkpoint, data, "batch_size=2")
    run_validate(cfg, workers=1)
    run_preprocess(cfg, workers=1)
    model = docev_tiny(image_token_id=1024)
    model.load_state_dict(DocEVCheckpointer(str(tiny_checkpoint)).load_checkpoint()["model"])
    return cfg, ShardDataset(shards_dir(cfg, "eval"), tile_size=112), model


def _hand(model, collate, dataset, indices, ratio):
    """Summed CE over every loss token, one sample at a time, full (unchunked) logits."""
    total, count = 0.0, 0
    for i in indices:
        b = collate([dataset[(i, ratio, 0)]])
        logits = model(b["tokens"], pixel_values=b["pixel_values"], image_sizes=b["image_sizes"],
                       image_grids=b["image_grids"], sampling_ratio=ratio)[0]  # fmt: skip
        target = b["labels"][0, 1:]
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


def test_eval_loss_equals_hand_computation(held_out, tmp_path):
    cfg, dataset, model = held_out
    assert len(dataset) >= 5 and set(dataset.manifest["sources"]) == {"instruct", "pretrain"}
    collate = build_collate(cfg, torch.float32, normalize=False)  # uint8, normalised by the evaluator
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    got = EvalLoss(cfg, dataset, collate, rank=0, world_size=1, checkpoint_dir=tmp_path).run(model, loss_fn, CPU)
    model.set_num_output_chunks(0)
    plain = build_collate(cfg, torch.float32)
    with torch.no_grad():
        hand = {r: _hand(model, plain, dataset, range(len(dataset)), r) for r in (2, 3)}
    for r, (total, count) in hand.items():
        assert got[f"eval_loss_r{r}"] == pytest.approx(total / count, rel=1e-5)
    assert got["eval_loss"] == pytest.approx((got["eval_loss_r2"] + got["eval_loss_r3"]) / 2)
    assert got["eval_tokens"] == sum(c for _, c in hand.values())
    assert model.training  # the evaluator restores the mode


def test_rank_shares_partition_the_samples(held_out, tmp_path):
    cfg, dataset, model = held_out
    collate = build_collate(cfg, torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    model.set_num_output_chunks(0)
    one = EvalLoss(cfg, dataset, collate, rank=0, world_size=1, checkpoint_dir=tmp_path)
    ranks = [EvalLoss(cfg, dataset, collate, rank=k, world_size=3, checkpoint_dir=tmp_path) for k in range(3)]
    counts = [len(list(r.batches(2))) for r in ranks]
    assert len(set(counts)) == 1  # every rank runs as many forwards (FSDP collectives match)
    sums = sum(r.local_sums(model, loss_fn, CPU) for r in ranks)
    whole = one.local_sums(model, loss_fn, CPU)
    assert torch.equal(sums[:, 1], whole[:, 1])
    torch.testing.assert_close(sums[:, 0], whole[:, 0], rtol=1e-5, atol=1e-4)
    capped = cfg.model_copy(update={"eval_max_batches": 1})
    assert len(list(EvalLoss(capped, dataset, collate, rank=0, world_size=1, checkpoint_dir=tmp_path).batches(3))) == 1


def test_due_and_best(held_out, tmp_path):
    cfg, dataset, _ = held_out
    every = cfg.model_copy(update={"eval_every_n_steps": 4})
    ev = EvalLoss(every, dataset, build_collate(cfg, torch.float32), rank=0, world_size=1, checkpoint_dir=tmp_path)
    assert [s for s in range(1, 10) if ev.due(s, last=s == 9)] == [4, 8, 9]
    (tmp_path / "step_4").mkdir()
    assert ev.improved(3.0)
    ev.mark_best(4, 3.0)
    assert not ev.improved(3.0) and ev.improved(2.9)
    again = EvalLoss(every, dataset, build_collate(cfg, torch.float32), rank=0, world_size=1, checkpoint_dir=tmp_path)
    assert again.best.step == 4 and again.best.eval_loss == 3.0  # a resumed run reads the record back
