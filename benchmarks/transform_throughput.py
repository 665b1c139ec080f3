"""Transform throughput: our DocEV transform vs the transformers reference path vs the floor.

Same synthetic records for all three paths, one process, best of ``--repeats`` runs:

* reference: PIL decode + ``convert("RGB")``, ``LlavaNextImageProcessorPil`` (the PIL LLaVA-NeXT
  processor, same ``image_grid_pinpoints``) to normalised float tiles, and
  ``AutoTokenizer.apply_chat_template`` with the assistant mask;
* ours: UFX → messages → :meth:`DocEVTransform.encode` (decode, base tile + canvas, ids + loss mask)
  → :meth:`DocEVTransform.expand` at ratio 2 (expanded ids/labels and uint8 tiles);
* floor: decode + one resize (to the canvas size) per image: no transform can do less.

    .venv/bin/python benchmarks/transform_throughput.py [--n 200] [--tile-size 560]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from docev.assets import init_checkpoint
from docev.data.messages import ufx_to_messages
from docev.data.transform import DocEVTransform, docev_preview_transform
from docev.synth import synth_data
from docev.vision.geometry import candidate_canvases, plan_tiles


def _best(fn: Callable[[dict], object], records: list[dict], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for rec in records:
            fn(rec)
        best = min(best, time.perf_counter() - start)
    return best


def reference_path(transform: DocEVTransform, root: Path) -> Callable[[dict], None]:
    """The per-sample transformers path for a UFX record: PIL decode, ``LlavaNextImageProcessorPil`` with
    the same pinpoints/mean/std/filter, and ``apply_chat_template`` with the assistant mask."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    t = transform.tile_size
    pinpoints = [list(c) for c in candidate_canvases(t, transform.min_num_tiles, transform.max_num_tiles)]
    processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints, size={"height": t, "width": t}, crop_size={"height": t, "width": t},
        image_mean=list(transform.pixels.mean), image_std=list(transform.pixels.std),
        resample=transform.pixels.resample, do_pad=False,
    )  # fmt: skip

    def reference(rec: dict) -> None:
        images = [Image.open(root / f).convert("RGB") for f in rec["image_files"]]
        processor(images, return_tensors="np")
        transform.tokenizer.apply_chat_template(
            rec["context"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )

    return reference


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="synthetic instruction records")
    ap.add_argument("--tile-size", type=int, default=560, help="560 = DocEV Preview; 112 = the tiny model")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="docev-bench-"))
    ckpt = init_checkpoint(work / "ckpt", seed=args.seed)
    root = synth_data(work / "synth", args.n, seed=args.seed, workers=2)["instruct"]
    records = [json.loads(line) for line in (root / "data.jsonl").read_text().splitlines()]
    pages = sum(len(r["image_files"]) for r in records)
    t = args.tile_size

    transform = docev_preview_transform(str(ckpt), tile_size=t, max_seq_len=65536)
    reference = reference_path(transform, root)

    def ours(rec: dict) -> None:
        out = transform.expand(transform.encode(ufx_to_messages(rec, image_root=root)), 2)
        assert out is not None

    def floor(rec: dict) -> None:
        for f in rec["image_files"]:
            image = Image.open(root / f).convert("RGB")
            h, w = plan_tiles(image.height, image.width, t, 1, 9).resized
            image.resize((w, h), transform.pixels.resample)

    times = {name: _best(fn, records, args.repeats) for name, fn in
             (("reference", reference), ("ours", ours), ("floor", floor))}  # fmt: skip
    print(f"{len(records)} records, {pages} pages, tile {t}, best of {args.repeats}")
    for name, sec in times.items():
        print(f"  {name:9s} {len(records) / sec:8.1f} samples/s  ({sec:.2f} s)")
    print(f"  ours vs reference: {times['reference'] / times['ours']:.2f}x faster (target >= 3x)")
    print(f"  ours vs floor:     {times['ours'] / times['floor']:.2f}x the floor's time (target <= 1.5x)")


if __name__ == "__main__":
    main()
