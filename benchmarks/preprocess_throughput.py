"""Preprocess throughput: samples/s writing shards with 1 and 2 workers, against the reference per-sample
transformers path (LlavaNextImageProcessorPil + apply_chat_template) on the same records in this run, and
bytes stored per sample against the original image bytes. The three run in turn for ``--repeats``
interleaved rounds (``timing.interleaved``; the shards are removed, untimed, before every run) and each
reports its median.

    .venv/bin/python benchmarks/preprocess_throughput.py [--n 200] [--tile-size 560] [--repeats 3]

Measured (200 pages, tile 560, 2 cores at load average ~20): reference 2.6 samples/s, 1 worker 4.5 (1.70x),
2 workers 4.4 (1.68x); 227,342 bytes stored per sample vs 40,802 of original images (5.56x).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from functools import partial
from pathlib import Path

from timing import for_each, interleaved
from transform_throughput import reference_path

from docev.assets import init_checkpoint
from docev.config import load_config
from docev.data.preprocess import run_preprocess, shards_dir
from docev.data.transform import transform_from_config
from docev.synth import synth_data
from docev.validate.runner import run_validate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--tile-size", type=int, default=560)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = init_checkpoint(work / "ckpt")
        root = synth_data(work / "data", args.n, seed=0)["instruct"]
        datasets = json.dumps([{"source": str(root), "name": "bench"}])
        cfg = load_config(CONFIG, [f"output_dir={work / 'run'}", f"tokenizer.model_name_or_path={ckpt}",
                                   "synthetic=null", f"datasets={datasets}", f"tokenizer.tile_size={args.tile_size}",
                                   "tokenizer.max_seq_len=65536", "validate.thumbnails=0",
                                   "preprocess.records_per_shard=25"])  # fmt: skip
        run_validate(cfg)
        records = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
        reference = reference_path(transform_from_config(cfg), root)
        # workers=2 runs last in each round, so its shards are still there for the byte counts below
        runs = {"reference": partial(for_each, reference, records), 1: partial(run_preprocess, cfg, workers=1),
                2: partial(run_preprocess, cfg, workers=2)}  # fmt: skip
        timed = interleaved(runs, args.repeats, before=lambda: shutil.rmtree(shards_dir(cfg), ignore_errors=True))
        manifest = timed[2].result
        rates = {w: manifest["total_samples"] / timed[w].median for w in (1, 2)}
        rates["reference"] = len(records) / timed["reference"].median
        n = manifest["total_samples"]
        print(f"{n} samples, tile {args.tile_size}, {manifest['image_format']} shards, median of {args.repeats} rounds")
        print(f"  reference (HF per sample, no shard written): {rates['reference']:6.1f} samples/s")
        for w in (1, 2):
            print(
                f"  preprocess workers={w}: {rates[w]:6.1f} samples/s = {rates[w] / rates['reference']:.2f}x reference"
            )
        stored = sum((shards_dir(cfg) / s["file"]).stat().st_size for s in manifest["shards"])
        print(f"  bytes/sample: shards {stored / n:,.0f} (images {manifest['bytes_stored_images'] / n:,.0f}) vs "
              f"original images {manifest['bytes_original_images'] / n:,.0f} "
              f"({manifest['bytes_stored_images'] / manifest['bytes_original_images']:.2f}x); a float32 tile tensor "
              f"would be {4 * 3 * args.tile_size**2:,} bytes per tile")  # fmt: skip


if __name__ == "__main__":
    main()
