import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from docev.data import dataset as dataset_module
from docev.data.dataset import ShardDataset
from docev.data.loader import build_collate, build_dataset
from docev.data.messages import ufx_to_messages
from docev.data.preprocess import merge, run_preprocess, run_shards, shards_dir
from docev.data.shards import ShardError
from docev.data.transform import transform_from_config
from docev.validate.runner import run_validate


def _config(tmp_path, ckpt, sources, *overrides):
    datasets = [
        {"source": str(sources["instruct"]), "name": "instruct"},
        {"source": str(sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain", "context_col": "text"},
    ]
    cfg = tiny_config(tmp_path, ckpt, datasets, "preprocess.records_per_shard=6", *overrides)
    run_validate(cfg, workers=1)
    return cfg


def _digests(cfg):
    return {s["file"]: s["sha256"] for s in json.loads((shards_dir(cfg) / "manifest.json").read_text())["shards"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint, synth_sources):
    cfg = _config(tmp_path_factory.mktemp("pre"), tiny_checkpoint, synth_sources)
    return cfg, run_preprocess(cfg, workers=1)


def test_manifest_accounts_for_every_validated_record(built):
    cfg, manifest = built
    assert manifest["total_samples"] == 25 and manifest["sources"] == {"instruct": 20, "pretrain": 5}
    assert len(manifest["shards"]) == 5 and sum(s["rows"] for s in manifest["shards"]) == 25
    assert manifest["ratios"] == [2, 3] and manifest["dropped"] == {}
    assert manifest["bytes_stored_images"] > 0


def test_deterministic_and_parallel_equal(tmp_path, tiny_checkpoint, synth_sources, built):
    cfg, _ = built
    again = _config(tmp_path / "again", tiny_checkpoint, synth_sources)
    run_preprocess(again, workers=2)
    assert _digests(again) == _digests(cfg)
    fanned = _config(tmp_path / "fanned", tiny_checkpoint, synth_sources)
    assert run_shards(fanned, 0, 2, workers=1) == [0, 2, 4]
    with pytest.raises(ShardError, match="2 of 5 shards missing"):
        merge(fanned)
    assert run_shards(fanned, 1, 2, workers=1) == [1, 3]
    merge(fanned)
    assert _digests(fanned) == _digests(cfg)


def test_resume_redoes_only_unfinished_shards(tmp_path, tiny_checkpoint, synth_sources, built):
    cfg, _ = built
    run = _config(tmp_path, tiny_checkpoint, synth_sources)
    run_preprocess(run, workers=1)
    out = shards_dir(run)
    # a kill -9 during shard 3: its data file half-written under the temp name, no sidecar
    (out / "shard-00003.json").unlink()
    (out / "shard-00003.arrow").rename(out / ".shard-00003.arrow.tmp")
    # a shard whose bytes rotted on disk after it was finished
    data = bytearray((out / "shard-00001.arrow").read_bytes())
    data[100] ^= 0xFF
    (out / "shard-00001.arrow").write_bytes(bytes(data))
    assert run_shards(run, workers=1) == [1, 3]
    merge(run)
    assert _digests(run) == _digests(cfg)


def test_corrupt_shard_is_detected_when_training_opens_it(tmp_path, tiny_checkpoint, synth_sources):
    cfg = _config(tmp_path, tiny_checkpoint, synth_sources)
    run_preprocess(cfg, workers=1)
    path = shards_dir(cfg) / "shard-00002.arrow"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-00002.arrow: sha256 .* corrupt shard"):
        build_dataset(cfg)


def test_shard_checksums_are_split_over_ranks_and_the_verdict_shared(
    tmp_path, tiny_checkpoint, synth_sources, monkeypatch
):
    """Each of 2 ranks hashes every other shard; a rank whose own half is clean still raises the other's error."""
    from docev.data import loader

    cfg = _config(tmp_path, tiny_checkpoint, synth_sources)
    run_preprocess(cfg, workers=1)
    path = shards_dir(cfg) / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[-50] ^= 0x01
    path.write_bytes(bytes(data))
    names = [s["file"] for s in json.loads((shards_dir(cfg) / "manifest.json").read_text())["shards"]]
    assert len(names) >= 3 and names[1] == path.name
    hashed: list[str] = []
    original = dataset_module.sha256_file
    monkeypatch.setattr(dataset_module, "sha256_file", lambda f: hashed.append(f.name) or original(f))
    shares = []
    for rank in (0, 1):
        hashed.clear()
        shares.append(build_dataset(cfg, verify_share=(rank, 2)).corrupt)
        assert hashed == names[rank::2]  # each shard hashed by one rank only
    assert shares[0] == [] and len(shares[1]) == 1 and "shard-00001.arrow: sha256" in shares[1][0]

    def all_gather_object(out, obj):  # what the other rank contributes: its own half's verdict
        out[:] = [obj, build_dataset(cfg, verify_share=(1, 2)).corrupt]

    monkeypatch.setattr(loader.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loader.dist, "all_gather_object", all_gather_object)
    with pytest.raises(ShardError, match=r"shard-00001.arrow: sha256 .* corrupt shard"):
        loader.verified_dataset(cfg, rank=0, world_size=2)


def test_other_config_or_tokenizer_is_refused(tmp_path, tiny_checkpoint, synth_sources):
    cfg = _config(tmp_path, tiny_checkpoint, synth_sources)
    run_preprocess(cfg, workers=1)
    changed = _config(tmp_path, tiny_checkpoint, synth_sources, "tokenizer.add_vision_id=true")
    with pytest.raises(ShardError, match="another config"):
        run_shards(changed, workers=1)
    with pytest.raises(ShardError, match="config_hash"):
        build_dataset(changed)


def _assert_samples_equal_the_online_transform(cfg, expect: int) -> None:
    ds = build_dataset(cfg)
    transform = transform_from_config(cfg)
    src = cfg.datasets[0]
    records = [json.loads(line) for line in (Path(src.source) / "data.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    checked = 0
    for i in range(len(ds)):
        item = ds[i]
        if item["id"] not in by_id:
            continue
        messages = ufx_to_messages(by_id[item["id"]], image_root=src.source)
        online = transform.encode(messages)
        assert item["tokens"] == online.tokens and item["loss_mask"] == online.loss_mask
        assert len(item["images"]) == len(online.images)
        t = cfg.tokenizer.tile_size
        for stored, tiled in zip(item["images"], online.images, strict=True):
            assert stored.plan == tiled.plan
            assert torch.equal(stored.pixels(t), tiled.pixels(t))  # lossless formats: the transform's pixels
        checked += 1
    assert checked == expect


def test_shard_samples_equal_the_online_transform(built):
    cfg, manifest = built
    kinds = Counter("original" if im["original"] else "tiles" for f in build_dataset(cfg).files
                    for row in f.reader().read_all().column("images").to_pylist() for im in row)  # fmt: skip
    assert kinds["original"] and kinds["tiles"]  # auto kept both: small originals, large pages as WebP tiles
    assert manifest["bytes_stored_images"] <= manifest["bytes_original_images"]  # never more than the images
    _assert_samples_equal_the_online_transform(cfg, 20)


@pytest.mark.parametrize("fmt", ["original", "png"])
def test_other_lossless_formats_equal_the_online_transform(tmp_path, tiny_checkpoint, synth_sources, fmt):
    datasets = [{"source": str(synth_sources["instruct"]), "name": "instruct"}]
    cfg = tiny_config(tmp_path, tiny_checkpoint, datasets, "preprocess.records_per_shard=8",
                      f"preprocess.image_format={fmt}")  # fmt: skip
    run_validate(cfg, workers=1)
    manifest = run_preprocess(cfg, workers=1)
    if fmt == "original":
        assert manifest["bytes_stored_images"] == manifest["bytes_original_images"]
    _assert_samples_equal_the_online_transform(cfg, 20)


def test_dataset_lengths_match_expansion(built):
    cfg, _ = built
    ds = build_dataset(cfg)
    transform = transform_from_config(cfg)
    collate = build_collate(cfg, torch.float32)
    lengths = ds.lengths()
    for i in range(0, len(ds), 4):
        for r in (2, 3):
            item = ds[(i, r, 0)]
            batch = collate([item])
            assert batch["num_tokens"] == lengths[r][i]
            assert batch["mask"] is None and batch["document_ids"] is None and batch["input_pos"] is None
            assert batch["tokens"].shape[1] == -(-lengths[r][i] // 8) * 8  # a multiple of the loss's 8 chunks
            image_tokens = sum(transform.image_tokens(h, w, r) for h, w in item["image_sizes"])
            assert int((batch["tokens"] == transform.image_token_id).sum()) == image_tokens


def test_packed_collate_ships_document_ids_and_positions(built):
    cfg, _ = built
    ds = ShardDataset(shards_dir(cfg), tile_size=112)
    collate = build_collate(
        cfg.model_copy(update={"dataloader": cfg.dataloader.model_copy(update={"packed": True})}), torch.float32
    )
    items = [ds[(i, 3, 0)] for i in range(3)] + [ds[(3, 3, 1)]]
    batch = collate(items)
    lens = [int(ds.lengths()[3][i]) for i in range(4)]
    assert batch["tokens"].shape == (2, cfg.tokenizer.max_seq_len)  # one shape for every packed batch
    assert batch["mask"] is None and batch["num_tokens"] == sum(lens)
    docs, pos, labels = batch["document_ids"], batch["input_pos"], batch["labels"]
    assert docs.shape == (2, cfg.tokenizer.max_seq_len) and docs.dtype == torch.int32  # 4 bytes a token, not S²
    a = lens[0]
    assert docs[0, a - 1].item() == 0 and docs[0, a].item() == 1  # no attention across samples
    assert docs[0, sum(lens[:3])].item() == -1 and docs[1, lens[3]].item() == -1  # padding is its own document
    assert torch.equal(batch["tokens"][1, lens[3] :], torch.full_like(batch["tokens"][1, lens[3] :], collate.pad_id))
    assert pos[0, a].item() == 0 and pos[0, a - 1].item() == a - 1
    assert labels[0, a].item() == -100 and labels[0, 0].item() == -100  # first label of each sample ignored
    assert batch["pixel_values"].shape[0] == sum(len(it["images"]) for it in items)
    pix = batch["pixel_values"]
    assert pix.dtype == torch.float32 and pix.min() >= -1.0 and pix.max() <= 1.0
    n_tiles = [im.plan.num_tiles for it in items for im in it["images"]]
    short = n_tiles.index(min(n_tiles))
    if min(n_tiles) < pix.shape[1]:  # padding tiles are zero pixels, normalised
        assert torch.all(pix[short, min(n_tiles) :] == -1.0)


def _per_sample_losses(model, batch):
    """Per-token CE with labels shifted as the recipe does."""
    logits = model(
        batch["tokens"], document_ids=batch["document_ids"], input_pos=batch["input_pos"],
        pixel_values=batch["pixel_values"],
        image_sizes=batch["image_sizes"], image_grids=batch["image_grids"], sampling_ratio=batch["sampling_ratio"],
    )  # fmt: skip
    labels = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return ce, labels


def test_packed_losses_equal_one_by_one(built, tiny_checkpoint):
    from docev.models.docev import DocEVCheckpointer, docev_tiny

    cfg, _ = built
    model = docev_tiny(image_token_id=1024)
    model.load_state_dict(DocEVCheckpointer(str(tiny_checkpoint)).load_checkpoint()["model"])
    model.eval()
    ds = build_dataset(cfg)
    packed_cfg = cfg.model_copy(update={"dataloader": cfg.dataloader.model_copy(update={"packed": True})})
    packed, plain = build_collate(packed_cfg, torch.float32), build_collate(cfg, torch.float32)
    picks = [0, 7, 21, 3]  # instruction and pretraining samples, with and without several images
    for ratio in (2, 3):
        items = [ds[(i, ratio, 0)] for i in picks]
        with torch.no_grad():
            ce, labels = _per_sample_losses(model, packed(items))
            start = 0
            for item in items:
                single = plain([item])
                ce1, labels1 = _per_sample_losses(model, single)
                n = single["num_tokens"]
                assert torch.equal(labels[0, start : start + n], labels1[0, :n])  # labels stay inside the sample
                torch.testing.assert_close(ce[0, start : start + n], ce1[0, :n], atol=2e-5, rtol=1e-5)
                start += n


def test_uint8_pixels_for_device_normalisation(built):
    cfg, _ = built
    ds = build_dataset(cfg)
    items = [ds[(i, 2, 0)] for i in (0, 2)]
    normalised = build_collate(cfg, torch.bfloat16)(items)["pixel_values"]
    collate = build_collate(cfg, torch.bfloat16, normalize=False)
    raw = collate(items)["pixel_values"]
    assert raw.dtype == torch.uint8 and normalised.dtype == torch.bfloat16
    assert torch.equal(collate.normalize_pixels(raw), normalised)


def test_shards_are_staged_once_per_node_and_verified(built, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from docev.data import staging

    cfg, manifest = built
    copies, real = [], staging._copy_verified
    monkeypatch.setattr(staging, "_copy_verified", lambda *a: (copies.append(a[1]), real(*a)))
    cache = tmp_path / "node-local"
    with ThreadPoolExecutor(4) as pool:  # four ranks of one node (flock excludes separate opens in one process too)
        folders = list(pool.map(lambda _: staging.stage_shards(shards_dir(cfg), cache), range(4)))
    assert len(set(folders)) == 1 and sorted(copies) == sorted(s["file"] for s in manifest["shards"])
    staged_cfg = cfg.model_copy(update={"dataloader": cfg.dataloader.model_copy(update={"cache_dir": str(cache)})})
    staged, original = build_dataset(staged_cfg), build_dataset(cfg)
    assert staged.dir == folders[0] and len(staged) == len(original) == 25
    assert staged.raw(7) == original.raw(7)
    assert len(copies) == len(manifest["shards"])  # the dataset found the node's copy: nothing copied again
    bad = tmp_path / "bad"
    shutil.copytree(shards_dir(cfg), bad)
    victim = bad / manifest["shards"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ShardError, match="while staging, manifest says"):
        staging.stage_shards(bad, tmp_path / "other-node")
