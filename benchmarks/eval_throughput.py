"""Evaluation throughput: answers/s with ``--batch`` prompts per generation vs one prompt at a time.

Tiny DocEV (random weights, the decoder perturbed so answers are not all the stop token), the held-out
questions of ``--records`` synthetic instruction records (validated and preprocessed, so their tiles are in
``shards/eval``), greedy decoding with ``--new`` new tokens at most, one thread on every side:
``answer_questions`` (what ``docev evaluate`` runs, images read from the eval shards) with one prompt per
generation and with ``--batch``, and ``--batch`` with the pages decoded and tiled again (how evaluation read
them before), in turn for ``--repeats`` interleaved rounds (medians). All must give the same answer to every
question (asserted). Prints the load average, answers/s by wall clock and by CPU time (the process's, one
thread: on a shared machine it leaves out the time spent waiting for a core), their ratios, and where a
question's CPU time goes: preparing the prompt (shard reads or page decoding, tiling, tokenizing), the vision
tower, the prefill, the decode steps, and the host's share (collate, the decode loop's own work, bookkeeping).
A last untimed round per way counts each part's FLOPs (``torch.utils.flop_counter``): GFLOP/s per part beside
one thread's matmul rate says which parts are compute-bound (the same work batched or not) and which are
per-call overhead (what batching removes).

    .venv/bin/python benchmarks/eval_throughput.py [--batch 8] [--records 24] [--new 16] [--repeats 5]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

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
PARTS = ("prepare", "vision", "prefill", "decode", "host")


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
        runs = {"one at a time": evaluate("one at a time", 1), f"batch {b}": evaluate(f"batch {b}", b),
                retiled: evaluate(retiled, b, None)}  # fmt: skip
        load = os.getloadavg()[0]
        with torch.inference_mode():
            timed = interleaved(runs, args.repeats)
            parts.counting = True
            for fn in runs.values():
                fn()
        load = (load, os.getloadavg()[0])
    one, many = timed["one at a time"], timed[f"batch {b}"]
    assert one.result == many.result == timed[retiled].result, "answers differ between the ways of answering"
    n = len(qs)
    print(
        f"{n} questions ({len(set(one.result))} distinct answers), max {new} new tokens, 1 thread, median of "
        f"{args.repeats} interleaved rounds, load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
    )
    cpu = {name: statistics.median(parts.cpu[name]) for name in runs}
    for name, t in timed.items():
        ms = {k: 1000 * statistics.median(v) / n for k, v in parts.seconds[name].items()}
        split = ", ".join(f"{k} {ms[k]:.1f}" for k in PARTS)
        real, padded = parts.prefill_tokens[name]
        print(f"{name:<16} {n / t.median:6.2f} answers/s wall, {n / cpu[name]:6.2f} by CPU time  (CPU ms per "
              f"question: {split}; prefill tokens {real} real, {padded} computed)")  # fmt: skip
    print(f"ratio batch {b} / one at a time: {one.median / many.median:.2f}x wall, "
          f"{cpu['one at a time'] / cpu[f'batch {b}']:.2f}x CPU time (identical answers); tiles from the eval "
          f"shards vs pages tiled again at batch {b}: {timed[retiled].median / many.median:.2f}x")  # fmt: skip
    peak = _matmul_gflops()
    print(f"GFLOP/s per part (one thread's float32 matmul rate at a large size: {peak:.1f}):")
    for name in ("one at a time", f"batch {b}"):
        rates = []
        for k in ("vision", "prefill", "decode"):
            flops, secs = parts.flops[name][k], statistics.median(parts.seconds[name][k])
            rates.append(f"{k} {flops / n / 1e6:.1f} MFLOP/question at {flops / secs / 1e9:.1f}")
        print(f"  {name:<14} " + ", ".join(rates))
    print(_ceiling(parts, n, b))


def _ceiling(parts: _PartTimer, n: int, b: int) -> str:
    """The best ratio batching could give on this thread: the vision tower and the prefill cost per question what
    they cost batched (their matmuls run at the same GFLOP/s, above), less the prefill's padding; a batch's decode
    step costs at least one prompt's step (the same ops, more rows); the host costs nothing."""
    ms = {name: {k: 1000 * statistics.median(v) / n for k, v in parts.seconds[name].items()} for name in parts.seconds}
    one, many = ms["one at a time"], ms[f"batch {b}"]
    real, padded = parts.prefill_tokens[f"batch {b}"]
    floor = many["prepare"] + many["vision"] + many["prefill"] * real / padded + one["decode"] / b
    total = sum(one.values())
    return (f"ceiling at batch {b} on one thread (no padding, a batch's decode step at one prompt's cost, no host "
            f"time): {total:.1f} / {floor:.1f} ms per question = {total / floor:.2f}x")  # fmt: skip


def _matmul_gflops(size: int = 512, repeats: int = 10) -> float:
    """One thread's float32 matmul rate (GFLOP/s, best of ``repeats``): the ceiling a compute-bound part meets."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - start)
    return 2 * size**3 / best / 1e9


class _PartTimer:
    """CPU seconds per round spent preparing prompts, in the vision tower, in prefills, in decode steps and on
    the host around them; prefill tokens (real and computed, padding included); with ``counting``, each part's
    FLOPs instead of its time."""

    def __init__(self, gen: DocEVGenerator):
        self.seconds: dict[str, dict[str, list[float]]] = {}
        self.cpu: dict[str, list[float]] = {}
        self.flops: dict[str, dict[str, int]] = {}
        self.prefill_tokens: dict[str, tuple[int, int]] = {}
        self.counting = False
        self._round: dict[str, float] = {}
        self._tokens = [0, 0]
        model = gen.model
        gen.encode = self._timed("prepare", gen.encode)
        model.image_features = self._timed("vision", model.image_features)
        prefill, step = self._timed("prefill", model.forward), self._timed("decode", model.forward)

        def forward(tokens, **kwargs):
            if tokens.shape[1] == 1:
                return step(tokens, **kwargs)
            width = tokens.shape[1]  # the mask's last prompt row is True at each row's real prompt tokens
            self._tokens[0] += int(kwargs["mask"][:, width - 1, :width].sum())
            self._tokens[1] += tokens.numel()
            return prefill(tokens, **kwargs)

        model.forward = forward

    def _timed(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if self.counting:
                with FlopCounterMode(display=False) as counter:
                    out = fn(*args, **kwargs)
                self._round[key] = self._round.get(key, 0.0) + counter.get_total_flops()
                return out
            start = time.process_time()
            out = fn(*args, **kwargs)
            self._round[key] = self._round.get(key, 0.0) + time.process_time() - start
            return out

        return wrapper

    def run(self, name: str, fn: Callable) -> list[str]:
        self._round, self._tokens = {}, [0, 0]
        start = time.process_time()
        out = fn()
        total = time.process_time() - start
        r = {k: self._round.get(k, 0.0) for k in PARTS}
        r["prefill"] -= r["vision"]  # the vision tower runs inside the prefill
        if self.counting:
            self.flops[name] = {k: int(v) for k, v in r.items()}
            return out
        r["host"] = total - sum(r.values())
        for key in PARTS:
            self.seconds.setdefault(name, {}).setdefault(key, []).append(r[key])
        self.cpu.setdefault(name, []).append(total)
        self.prefill_tokens[name] = (self._tokens[0], self._tokens[1])
        return out


if __name__ == "__main__":
    main()
