"""Transform throughput: our DocEV transform vs the transformers reference path vs the floor.

Same synthetic records for every path, one process, ``--repeats`` interleaved rounds (``timing.interleaved``),
median per path:

* reference: PIL decode + ``convert("RGB")``, ``LlavaNextImageProcessorPil`` (the PIL LLaVA-NeXT
  processor, same ``image_grid_pinpoints``) to normalised float tiles, and
  ``AutoTokenizer.apply_chat_template`` with the assistant mask;
* ours: UFX → messages → :meth:`DocEVTransform.encode` (decode, base tile + canvas, ids + loss mask)
  → :meth:`DocEVTransform.expand` at ratio 2 (expanded ids/labels and uint8 tiles);
* ours + normalise: the same, then :meth:`DocEVTransform.normalize` to float32 tiles — the reference's
  output, so this ratio compares equal work (training normalises on the device instead, so "ours" is
  what the host pays there);
* floor: decode + one resize (to the canvas size) per image: no transform can do less;
* floor + base tile: decode + the two resizes the anyres output is made of (the canvas and the whole page to
  one tile, each from the decoded page, as the reference does): what any exact transform pays for pixels.
  Ours over this is the rest: tokenizing, and cutting the canvas into tiles.

    .venv/bin/python benchmarks/transform_throughput.py [--n 200] [--tile-size 560] [--repeats 3]

Measured: see docs/architecture.md (Transform).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from timing import for_each, interleaved

from docev.assets import init_checkpoint
from docev.data.messages import ufx_to_messages
from docev.data.transform import DocEVTransform, docev_preview_transform
from docev.synth import synth_data
from docev.vision.geometry import candidate_canvases, plan_tiles


def reference_path(transform: DocEVTransform, checkpoint: Path, root: Path) -> Callable[[dict], None]:
    """The per-sample transformers path for a UFX record: PIL decode, ``LlavaNextImageProcessorPil`` with
    the same pinpoints/mean/std/filter, and ``AutoTokenizer.apply_chat_template`` (the checkpoint's) with the
    assistant mask."""
    from transformers import AutoTokenizer, PretrainedConfig
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    t = transform.tile_size
    pinpoints = [list(c) for c in candidate_canvases(t, transform.min_num_tiles, transform.max_num_tiles)]
    processor = LlavaNextImageProcessorPil(
        image_grid_pinpoints=pinpoints, size={"height": t, "width": t}, crop_size={"height": t, "width": t},
        image_mean=list(transform.pixels.mean), image_std=list(transform.pixels.std),
        resample=transform.pixels.resample, do_pad=False,
    )  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True, config=PretrainedConfig())

    def reference(rec: dict) -> None:
        images = [Image.open(root / f).convert("RGB") for f in rec["image_files"]]
        processor(images, return_tensors="np")
        tokenizer.apply_chat_template(
            rec["context"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )

    return reference


def floor(transform: DocEVTransform, root: Path, rec: dict, base_tile: bool = False) -> None:
    """Decode and resize each of the record's pages to its canvas size (and to one tile with ``base_tile``)."""
    t = transform.tile_size
    for f in rec["image_files"]:
        image = Image.open(root / f).convert("RGB")
        h, w = plan_tiles(image.height, image.width, t, 1, 9).resized
        image.resize((w, h), transform.pixels.resample)
        if base_tile:
            image.resize((t, t), transform.pixels.resample)


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
    reference = reference_path(transform, ckpt, root)

    def ours(rec: dict) -> dict:
        out = transform.expand(transform.encode(ufx_to_messages(rec, image_root=root)), 2)
        assert out is not None
        return out

    def ours_normalised(rec: dict) -> None:
        for pixels in ours(rec)["pixel_values"]:
            transform.normalize(pixels, torch.float32)

    paths = {"reference": reference, "ours": ours, "ours + normalise": ours_normalised,
             "floor": partial(floor, transform, root), "floor + base tile": partial(floor, transform, root,
                                                                                    base_tile=True)}  # fmt: skip
    timed = interleaved({name: partial(for_each, fn, records) for name, fn in paths.items()}, args.repeats)
    times = {name: t.median for name, t in timed.items()}
    print(f"{len(records)} records, {pages} pages, tile {t}, median of {args.repeats} interleaved rounds")
    for name, sec in times.items():
        print(f"  {name:16s} {len(records) / sec:8.1f} samples/s  ({sec:.2f} s)")
    ref = times["reference"]
    print(f"  ours / reference samples/s:             {ref / times['ours']:.2f}x (target >= 3x; uint8 tiles "
          "vs the reference's normalised floats)")  # fmt: skip
    print(f"  ours + normalise / reference samples/s: {ref / times['ours + normalise']:.2f}x (equal work: both end "
          "in normalised float32 tiles)")  # fmt: skip
    over_floor, pixels = times["ours"] / times["floor"], times["ours"] / times["floor + base tile"]
    print(f"  ours vs floor:                          {over_floor:.2f}x the floor's time (target <= 1.5x)")
    print(f"  ours vs floor + base tile:              {pixels:.2f}x (the rest: tokenizing, cutting tiles); the base "
          f"tile's resize is {times['floor + base tile'] / times['floor']:.2f}x the floor")  # fmt: skip


if __name__ == "__main__":
    main()
