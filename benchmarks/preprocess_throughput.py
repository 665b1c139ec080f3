"""Preprocess throughput per worker against the reference per-sample transformers path, in one run.

Every number below is measured on the same synthetic records in this command, contestants interleaved round
after round (``timing.interleaved``; shards removed, untimed, before every run), median of ``--repeats``:

* reference (steady state): ``LlavaNextImageProcessorPil`` + ``apply_chat_template`` per record, set up once;
* floor: decode + the two resizes (canvas, base tile) of every page, the pixel work of the reference that any
  exact preprocess of a page it cannot keep whole pays too: reference / floor bounds the ratio when every page
  must be tiled (tile 112);
* preprocess (steady state): one worker's :class:`ShardBuilder`, set up once as a pool worker is, building
  every shard of the split with ``records_per_shard`` as in ``configs/docev_preview.yaml`` (2048) and as in
  ``configs/tiny.yaml`` (16: the per-shard costs — write, fsync, verify, hash, sidecar — paid 16x as often);
* fixed cost per task (process start to first sample): a fresh ``python`` running ``docev preprocess`` over a
  one-record shard (``records_per_shard=1 --shard 0/N``: imports, config, tokenizer, one sample, one shard),
  against a fresh ``python`` that sets up the reference and processes one record;
* bytes per sample: the shards' image bytes against the original images';
* the ``auto`` format's size rule (``docev.data.shards.stores_original``) against the full comparison that
  encodes every image's tiles (untimed): how many images it decides the same way;
* the fast-effort rule (``docev.data.shards.auto_encodings``): for the pages it sends to libwebp's fastest
  lossless effort, both efforts' bytes against the originals' and their encode time (CPU ms per image, best of 3).

    .venv/bin/python benchmarks/preprocess_throughput.py [--n 200] [--tile-size 560] [--repeats 3]

Measured: see the README (Preprocessing) and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from timing import for_each, interleaved
from transform_throughput import floor, reference_path

from docev.assets import init_checkpoint
from docev.config import load_config
from docev.data.preprocess import ShardBuilder, _chunks, config_hash, count_shards, shards_dir, tokenizer_fingerprint
from docev.data.shards import auto_encodings, encode_image, image_row, stores_original
from docev.data.transform import transform_from_config
from docev.synth import synth_data
from docev.validate.runner import run_validate
from docev.vision.image_io import load_image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
ENCODINGS = ("webp_lossless_fast", "webp_lossless")  # libwebp's fastest lossless effort, method 1
SHARD_SIZES = {"preview": 2048, "tiny": 16}  # records_per_shard of configs/docev_preview.yaml and configs/tiny.yaml

REFERENCE_TASK = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {bench!r})
from transform_throughput import reference_path
from docev.config import load_config
from docev.data.transform import transform_from_config
cfg = load_config({config!r}, {overrides!r})
root = Path({root!r})
record = json.loads((root / "data.jsonl").read_text().splitlines()[0])
reference_path(transform_from_config(cfg), cfg.tokenizer.model_name_or_path, root)(record)
"""


def build_all(builder: ShardBuilder, chunks: list[tuple[int, list]]) -> int:
    for k, entries in chunks:
        builder.build(k, entries)
    return sum(len(e) for _, e in chunks)


def task(argv: list[str]) -> None:
    """A fresh interpreter running ``argv`` (a task's whole life: start, imports, work, exit)."""
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})


def rule_agreement(cfg, records: list[dict], root: Path) -> tuple[int, int, int, dict[str, list[float]]]:
    """(images, decided by size, of those the same as encoding the tiles and comparing, and for the images
    sent to the fast effort first: per encoding its tiles' bytes / the original's bytes and its CPU ms)."""
    t = transform_from_config(cfg)
    total = by_size = same = 0
    fast: dict[str, list[float]] = {k: [] for e in ENCODINGS for k in (e, f"{e} ms")} | {"original": []}
    for rec in records:
        for name in rec.get("image_files", []):
            blob = (root / name).read_bytes()
            tiled = t.tile(load_image(io.BytesIO(blob), name=name))
            total += 1
            if stores_original("auto", tiled.plan, t.tile_size, len(blob)):
                by_size += 1
                same += bool(image_row(tiled, "auto", 95, blob)["original"])
            elif auto_encodings(tiled.plan, t.tile_size)[0] == "webp_lossless_fast":
                fast["original"].append(len(blob))
                for e in ENCODINGS:
                    size, ms = _encode(tiled, e)
                    fast[e].append(size)
                    fast[f"{e} ms"].append(ms)
    return total, by_size, same, fast


def _encode(tiled, encoding: str) -> tuple[int, float]:
    """Bytes of an image's tiles (base + resized) in ``encoding`` and the CPU ms to encode them (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        size = sum(len(encode_image(im, encoding, 95)) for im in (tiled.base, tiled.resized))
        best = min(best, time.process_time() - start)
    return size, 1e3 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tile-size", type=int, default=560, help="560 = DocEV Preview; 112 = the tiny model")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = init_checkpoint(work / "ckpt")
        root = synth_data(work / "data", args.n, seed=0)["instruct"]
        datasets = json.dumps([{"source": str(root), "name": "bench"}])
        common = [f"tokenizer.model_name_or_path={ckpt}", "synthetic=null", f"datasets={datasets}",
                  f"tokenizer.tile_size={args.tile_size}", "tokenizer.max_seq_len=65536",
                  "validate.thumbnails=0"]  # fmt: skip
        cfgs = {}
        for name, size in {**SHARD_SIZES, "task": 1}.items():
            overrides = [*common, f"output_dir={work / name}", f"preprocess.records_per_shard={size}"]
            cfgs[name] = (load_config(CONFIG, overrides), overrides)
            run_validate(cfgs[name][0])
        records = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
        cfg = cfgs["preview"][0]
        reference = reference_path(transform_from_config(cfg), ckpt, root)
        builders = {name: ShardBuilder(cfgs[name][0], config_hash(cfgs[name][0]), tokenizer_fingerprint(ckpt))
                    for name in SHARD_SIZES}  # fmt: skip
        chunks = {name: list(_chunks(cfgs[name][0])) for name in SHARD_SIZES}

        task_cfg, task_overrides = cfgs["task"]
        ours_task = [sys.executable, "-m", "docev.cli", "preprocess", "--config", str(CONFIG), "--workers", "1",
                     "--shard", f"0/{count_shards(task_cfg)}", *task_overrides]  # fmt: skip
        script = REFERENCE_TASK.format(bench=str(Path(__file__).parent), config=str(CONFIG),
                                       overrides=task_overrides, root=str(root))  # fmt: skip
        runs = {
            "reference": partial(for_each, reference, records),
            "floor": partial(for_each, partial(floor, transform_from_config(cfg), root, base_tile=True), records),
            **{name: partial(build_all, builders[name], chunks[name]) for name in SHARD_SIZES},
            "task: reference": partial(task, [sys.executable, "-c", script]),
            "task: preprocess": partial(task, ours_task),
        }

        def clean() -> None:
            for c, _ in cfgs.values():
                shutil.rmtree(shards_dir(c), ignore_errors=True)

        start = time.perf_counter()
        timed = interleaved(runs, args.repeats, before=clean)
        wall = time.perf_counter() - start
        n = len(records)
        rate = {name: n / timed[name].median for name in ("reference", "floor", *SHARD_SIZES)}
        print(f"{n} records, {sum(len(r['image_files']) for r in records)} pages, tile {args.tile_size}, "
              f"{cfg.preprocess.image_format} shards, median of {args.repeats} interleaved rounds ({wall:.0f} s); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
        print(f"  reference (HF per sample, no shard written): {rate['reference']:7.1f} samples/s")
        print(f"  floor (decode + canvas and base-tile resizes of every page): {rate['floor']:7.1f} samples/s "
              f"= {rate['floor'] / rate['reference']:.2f}x reference")  # fmt: skip
        for name, size in SHARD_SIZES.items():
            print(f"  preprocess, one worker, {size:4d} records/shard ({name:7s}): {rate[name]:7.1f} samples/s "
                  f"= {rate[name] / rate['reference']:.2f}x reference")  # fmt: skip
        ref_task, our_task = timed["task: reference"].median, timed["task: preprocess"].median
        print(f"  fixed cost per task (process start to first sample): preprocess {our_task:.2f} s, "
              f"reference {ref_task:.2f} s ({our_task / ref_task:.2f}x)")  # fmt: skip

        clean()
        build_all(builders["preview"], chunks["preview"])
        side = json.loads((shards_dir(cfg) / "shard-00000.json").read_text())
        stored, original = side["bytes_stored"], side["bytes_original"]
        shard_bytes = (shards_dir(cfg) / "shard-00000.arrow").stat().st_size
        print(f"  bytes/sample: shards {shard_bytes / n:,.0f} (images {stored / n:,.0f}) vs original images "
              f"{original / n:,.0f} ({stored / original:.2f}x)")  # fmt: skip
        total, by_size, same, fast = rule_agreement(cfg, records, root)
        print(f"  auto format: {by_size} of {total} images kept as their original by size alone (no encode); "
              f"encoding their tiles and comparing keeps the original for {same} of them")  # fmt: skip
        if fast["original"]:
            orig = sum(fast["original"])
            for e in ENCODINGS:
                wins = sum(b < o for b, o in zip(fast[e], fast["original"], strict=True))
                print(f"  {len(fast['original'])} images shrunk to <= 1/4 of their pixels, tiles as {e}: "
                      f"{sum(fast[e]) / orig:.2f}x the original bytes, smaller than the original for {wins}, "
                      f"{statistics.median(fast[e + ' ms']):.1f} CPU ms per image (median)")  # fmt: skip


if __name__ == "__main__":
    main()
