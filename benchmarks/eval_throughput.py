"""Evaluation throughput: answers/s with ``--batch`` prompts per generation vs one prompt at a time.

Tiny DocEV (random weights, the decoder perturbed so answers are not all the stop token), the
questions of ``--records`` synthetic instruction records, greedy decoding with ``--new`` new tokens
at most. Both paths answer the same questions in the same order and must give identical answers
(asserted); prints answers/s for each and their ratio, measured in the same run (best of ``--repeats``).

    .venv/bin/python benchmarks/eval_throughput.py [--batch 8] [--records 24] [--new 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from docev.assets import init_checkpoint
from docev.evaluation.evaluate import answer_questions
from docev.evaluation.questions import record_questions
from docev.inference import DocEVGenerator
from docev.synth import synth_data


def _best(generator: DocEVGenerator, questions: list, batch: int, new: int, repeats: int) -> tuple[float, list[str]]:
    best, answers = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        answers = answer_questions(generator, questions, batch_size=batch, max_new_tokens=new, sampling_ratio=2)
        best = min(best, time.perf_counter() - start)
    return len(questions) / best, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--new", type=int, default=16, help="max new tokens per answer")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: on a shared machine, idle intra-op threads spin and skew timings
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(Path(tmp) / "ckpt")
        src = synth_data(Path(tmp) / "data", args.records, seed=0, fmt="jsonl", workers=1)["instruct"]
        records = [json.loads(x) for x in (src / "data.jsonl").read_text().splitlines()]
        questions = [q for r in records for q in record_questions(r, "synthetic", str(src), None)]
        generator = DocEVGenerator(ckpt)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in generator.model.decoder.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        one_rate, one = _best(generator, questions, 1, args.new, args.repeats)
        many_rate, many = _best(generator, questions, args.batch, args.new, args.repeats)
    assert one == many, "batched answers differ from one-at-a-time answers"
    distinct = len(set(one))
    print(f"{len(questions)} questions ({distinct} distinct answers), max {args.new} new tokens, 1 thread")
    print(f"one at a time: {one_rate:.2f} answers/s")
    print(f"batch {args.batch}:       {many_rate:.2f} answers/s")
    print(f"ratio: {many_rate / one_rate:.2f}x (identical answers)")


if __name__ == "__main__":
    main()
