import json
import shutil

import pytest
from conftest import tiny_config

from docev.config import ConfigError
from docev.data.dataset import ShardDataset
from docev.data.preprocess import run_preprocess, shards_dir
from docev.data.split import unit_hash
from docev.validate.runner import merge, run_shard, run_validate, validate_dir


def _splits(cfg):
    lines = (validate_dir(cfg) / "manifest.jsonl").read_text().splitlines()
    return {(e["source"], e["id"]): e["split"] for e in map(json.loads, lines)}


def _datasets(sources, **instruct):
    return [
        {"source": str(sources["instruct"]), "name": "instruct", **instruct},
        {"source": str(sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain", "context_col": "text"},
    ]


def test_unit_hash_is_stable_and_uniform():
    assert unit_hash("a", "r1", 0) == unit_hash("a", "r1", 0)
    assert unit_hash("a", "r1", 0) != unit_hash("a", "r1", 1) != unit_hash("b", "r1", 0)
    share = sum(unit_hash("s", str(i), 0) < 0.2 for i in range(5000)) / 5000
    assert 0.18 < share < 0.22


def test_split_same_on_rerun_and_fanout(tmp_path, tiny_checkpoint, synth_sources):
    data = _datasets(synth_sources, eval_fraction=0.3)
    one = tiny_config(tmp_path / "one", tiny_checkpoint, data)
    run_validate(one, workers=1)
    first = _splits(one)
    assert set(first.values()) == {"train", "eval"}
    run_validate(one, workers=1)
    assert _splits(one) == first
    fanned = tiny_config(tmp_path / "fan", tiny_checkpoint, data)
    for i in range(3):
        run_shard(fanned, i, 3, workers=1)
    merge(fanned, 3)
    assert _splits(fanned) == first
    report = json.loads((validate_dir(one) / "report.json").read_text())
    held = sum(s == "eval" for (src, _), s in first.items() if src == "instruct")
    assert report["split"]["instruct"] == {"train": 20 - held, "eval": held, "unused": 0}
    assert report["split"]["pretrain"]["eval"] == 0
    assert "| held out |" in (validate_dir(one) / "report.md").read_text()


def test_appended_records_keep_the_split(tmp_path, tiny_checkpoint, synth_sources):
    src = synth_sources["instruct"]
    lines = (src / "data.jsonl").read_text().splitlines(keepends=True)
    grown = tmp_path / "grown"
    shutil.copytree(src, grown)
    (grown / "data.jsonl").write_text("".join(lines[:12]))
    data = [{"source": str(grown), "name": "instruct", "eval_fraction": 0.3, "eval_records": 4}]
    cfg = tiny_config(tmp_path / "out", tiny_checkpoint, data)
    run_validate(cfg, workers=1)
    before = _splits(cfg)
    (grown / "data.jsonl").write_text("".join(lines))
    run_validate(cfg, workers=1)
    after = _splits(cfg)
    assert len(after) == 20 and {k: after[k] for k in before} == before
    assert sum(s == "eval" for s in after.values()) <= 4


def test_eval_shards_are_disjoint_from_training(tmp_path, tiny_checkpoint, synth_sources):
    data = _datasets(synth_sources, eval_fraction=0.3)
    extra = [{"source": str(synth_sources["pretrain"]), "name": "pretrain-eval", "ufx_type": "pretrain",
              "context_col": "text", "eval_records": 2}]  # fmt: skip
    cfg = tiny_config(tmp_path, tiny_checkpoint, data, f"eval_datasets={json.dumps(extra)}")
    run_validate(cfg, workers=1)
    splits = _splits(cfg)
    manifest = run_preprocess(cfg, workers=1)
    train = ShardDataset(shards_dir(cfg), tile_size=112)
    held = ShardDataset(shards_dir(cfg, "eval"), tile_size=112)
    train_ids = {(train.raw(i)["source"], train.raw(i)["id"]) for i in range(len(train))}
    eval_ids = {(held.raw(i)["source"], held.raw(i)["id"]) for i in range(len(held))}
    assert not train_ids & eval_ids
    assert eval_ids == {k for k, s in splits.items() if s == "eval"}
    assert manifest["eval_samples"] == len(held) and held.manifest["sources"]["pretrain-eval"] == 2
    assert sum(s == "unused" for (src, _), s in splits.items() if src == "pretrain-eval") == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('datasets=[{"source": "x", "eval_records": 3}]', "datasets.0.eval_records: caps the held-out"),
        ('datasets=[{"source": "x", "eval_fraction": 1.0}]', "datasets.0.eval_fraction"),
        ('eval_datasets=[{"source": "x", "eval_fraction": 0.1}]', "eval_datasets.0.eval_fraction: an eval-only"),
        ('eval_datasets=[{"source": "a/x"}]', "source name 'x' used twice"),
    ],
)
def test_split_config_errors(tmp_path, tiny_checkpoint, override, message):
    base = 'datasets=[{"source": "x"}]'
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, tiny_checkpoint, None, base, override)
