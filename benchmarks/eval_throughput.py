"""Evaluation throughput: answers/s with ``--batch`` prompts per generation vs one prompt at a time.

Tiny DocEV (random weights, the decoder perturbed so answers are not all the stop token), the held-out
questions of ``--records`` synthetic instruction records (validated and preprocessed, so their tiles are in
``shards/eval``), greedy decoding with ``--new`` new tokens at most, one thread: ``answer_questions`` (what
``docev evaluate`` runs, images read from the eval shards) with one prompt per generation and with ``--batch``,
and ``--batch`` with the pages decoded and tiled again (how evaluation read them before), in turn for
``--repeats`` interleaved rounds (medians). All must give the same answer to every question (asserted).
Prints answers/s, the ratios, and where a question's time goes (preparing the prompt: image decoding or shard
reads, tiling, tokenizing; the vision tower; prefill; decode steps).

    .venv/bin/python benchmarks/eval_throughput.py [--batch 8] [--records 24] [--new 16] [--repeats 5]"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved  # noqa: E402

from docev.assets import init_checkpoint  # noqa: E402
from docev.config import load_config  # noqa: E402
from docev.data.preprocess import run_preprocess  # noqa: E402
from docev.evaluation.evaluate import answer_questions  # noqa: E402
from docev.evaluation.questions import eval_questions  # noqa: E402
from docev.evaluation.tiles import HeldOutTiles  # noqa: E402
from docev.inference import DocEVGenerator  # noqa: E402
from docev.synth import synth_data  # noqa: E402
from docev.validate.runner import run_validate  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--new", type=int, default=16, help="max new tokens per answer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: on a shared machine, idle intra-op threads spin and skew timings
    b, new = args.batch, args.new
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(Path(tmp) / "ckpt")
        src = synth_data(Path(tmp) / "data", args.records, seed=0, fmt="jsonl", workers=1)["instruct"]
        datasets = json.dumps([{"source": str(src), "name": "synthetic", "eval_fraction": 0.99}])
        cfg = load_config(CONFIG, [f"output_dir={Path(tmp) / 'run'}", f"tokenizer.model_name_or_path={ckpt}",
                                   "synthetic=null", f"datasets={datasets}", "validate.thumbnails=0"])  # fmt: skip
        run_validate(cfg, workers=1)
        run_preprocess(cfg, workers=1)
        qs, tiles = list(eval_questions(cfg)), HeldOutTiles(cfg)
        gen = DocEVGenerator(ckpt)
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in gen.model.decoder.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.1)
        parts = _PartTimer(gen)

        def evaluate(name: str, batch: int, shards: HeldOutTiles | None = tiles):
            return lambda: parts.run(name, lambda: answer_questions(gen, qs, batch_size=batch, max_new_tokens=new,
                                                                     sampling_ratio=2, tiles=shards))  # fmt: skip

        retiled = f"batch {b}, pages"
        with torch.inference_mode():
            runs = {"one at a time": evaluate("one at a time", 1), f"batch {b}": evaluate(f"batch {b}", b),
                    retiled: evaluate(retiled, b, None)}  # fmt: skip
            timed = interleaved(runs, args.repeats)
    one, many = timed["one at a time"], timed[f"batch {b}"]
    assert one.result == many.result == timed[retiled].result, "answers differ between the ways of answering"
    print(f"{len(qs)} questions ({len(set(one.result))} distinct answers), max {new} new tokens, 1 thread, "
          f"median of {args.repeats} interleaved rounds")  # fmt: skip
    for name, t in timed.items():
        ms = {k: 1000 * statistics.median(v) / len(qs) for k, v in parts.seconds[name].items()}
        split = ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
        print(f"{name:<16} {len(qs) / t.median:6.2f} answers/s  (ms per question: {split})")
    print(f"ratio: {one.median / many.median:.2f}x (identical answers); tiles from the eval shards vs pages tiled "
          f"again at batch {b}: {timed[retiled].median / many.median:.2f}x")  # fmt: skip


class _PartTimer:
    """Seconds per round spent preparing prompts, in the vision tower, in prefills and in decode steps."""

    def __init__(self, gen: DocEVGenerator):
        self.seconds: dict[str, dict[str, list[float]]] = {}
        self._round: dict[str, float] = {}
        model = gen.model
        gen.prepare_batch = self._timed("prepare", gen.prepare_batch)
        model.image_features = self._timed("vision", model.image_features)
        prefill, step = self._timed("prefill", model.forward), self._timed("decode", model.forward)
        model.forward = lambda tokens, **k: (prefill if tokens.shape[1] > 1 else step)(tokens, **k)

    def _timed(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._round[key] = self._round.get(key, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    def run(self, name: str, fn: Callable) -> list[str]:
        self._round = {}
        out = fn()
        r = dict(self._round)
        r["prefill"] = r.get("prefill", 0.0) - r.get("vision", 0.0)  # the vision tower runs inside the prefill
        for key in ("prepare", "vision", "prefill", "decode"):
            self.seconds.setdefault(name, {}).setdefault(key, []).append(r.get(key, 0.0))
        return out


if __name__ == "__main__":
    main()
