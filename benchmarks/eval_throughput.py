"""Evaluation throughput: answers/s with ``--batch`` prompts per generation vs one prompt at a time.

Tiny DocEV (random weights, the decoder perturbed so answers are not all the stop token), the
questions of ``--records`` synthetic instruction records, greedy decoding with ``--new`` new tokens
at most, one thread: ``answer_questions`` (what ``docev evaluate`` runs) with one prompt per generation
and with ``--batch``, in turn for ``--repeats`` interleaved rounds (medians). Both must give the same
answer to every question (asserted). Prints answers/s, the ratio, and where a question's time goes
(preparing the prompt: image decoding, tiling, tokenizing; the vision tower; prefill; decode steps).

    .venv/bin/python benchmarks/eval_throughput.py [--batch 8] [--records 24] [--new 16] [--repeats 5]
"""

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
from docev.evaluation.evaluate import answer_questions  # noqa: E402
from docev.evaluation.questions import record_questions  # noqa: E402
from docev.inference import DocEVGenerator  # noqa: E402
from docev.synth import synth_data  # noqa: E402


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
        records = [json.loads(x) for x in (src / "data.jsonl").read_text().splitlines()]
        qs = [q for r in records for q in record_questions(r, "synthetic", str(src), None)]
        gen = DocEVGenerator(ckpt)
        noise = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in gen.model.decoder.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * 0.1)
        parts = _PartTimer(gen)

        def evaluate(name: str, batch: int):
            return lambda: parts.run(name, lambda: answer_questions(gen, qs, batch_size=batch, max_new_tokens=new,
                                                                     sampling_ratio=2))  # fmt: skip

        with torch.inference_mode():
            runs = {"one at a time": evaluate("one at a time", 1), f"batch {b}": evaluate(f"batch {b}", b)}
            timed = interleaved(runs, args.repeats)
    one, many = timed["one at a time"], timed[f"batch {b}"]
    assert one.result == many.result, "batched answers differ from one-at-a-time answers"
    print(f"{len(qs)} questions ({len(set(one.result))} distinct answers), max {new} new tokens, 1 thread, "
          f"median of {args.repeats} interleaved rounds")  # fmt: skip
    for name, t in timed.items():
        ms = {k: 1000 * statistics.median(v) / len(qs) for k, v in parts.seconds[name].items()}
        split = ", ".join(f"{k} {v:.1f}" for k, v in ms.items())
        print(f"{name:<14} {len(qs) / t.median:6.2f} answers/s  (ms per question: {split})")
    print(f"ratio: {one.median / many.median:.2f}x (identical answers)")


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
