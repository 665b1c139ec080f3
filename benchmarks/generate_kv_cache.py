"""Greedy generation with the KV cache vs recomputing the whole sequence each step (the reference).

Tiny DocEV (random weights), one synthetic page at sampling ratio 2, no stop token, so both paths
make exactly ``--new`` tokens and must produce the same ids. Prints milliseconds per generated
token for each path and their ratio (the cache's speed-up), in the same run.

    .venv/bin/python benchmarks/generate_kv_cache.py [--new 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from docev.assets import init_checkpoint
from docev.inference import DocEVGenerator, greedy_generate
from docev.synth import synth_data


def _best_ms_per_token(generator: DocEVGenerator, inputs: dict, new: int, use_cache: bool, repeats: int):
    tokens, images = inputs["tokens"], {k: v for k, v in inputs.items() if k != "tokens"}
    best, ids = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        ids, _ = greedy_generate(
            generator.model, tokens, max_new_tokens=new, stop_token_ids=[],
            suppress_token_ids=generator.suppress_token_ids, use_cache=use_cache, **images,
        )  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return 1000 * best / new, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per path")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = init_checkpoint(Path(tmp) / "ckpt")
        page = sorted(
            (synth_data(Path(tmp) / "data", 2, seed=0, fmt="jsonl", workers=1)["instruct"] / "images").glob("*")
        )[0]
        generator = DocEVGenerator(ckpt)
        inputs = generator.prepare([page], "What does this document say?", sampling_ratio=2)
        cached, ids_cached = _best_ms_per_token(generator, inputs, args.new, True, args.repeats)
        full, ids_full = _best_ms_per_token(generator, inputs, args.new, False, args.repeats)
    assert ids_cached == ids_full, "cached and uncached greedy decoding disagree"
    prompt = inputs["tokens"].shape[1]
    print(f"prompt {prompt} tokens (1 page), {args.new} new tokens, tiny DocEV, CPU, 2 threads")
    print(f"recompute every step : {full:8.2f} ms/token")
    print(f"KV cache             : {cached:8.2f} ms/token")
    print(f"speed-up             : {full / cached:8.2f}x (same {len(ids_cached)} ids)")


if __name__ == "__main__":
    main()
