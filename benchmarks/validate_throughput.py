"""Validate throughput and memory: records/s with 1 and 2 workers on 1,000 synthetic records (``--repeats``
interleaved rounds, ``timing.interleaved``, the output removed untimed before every run; medians), and the
peak RSS of a validation child process at 1k and 10k records (memory must stay flat as input grows), and
at 1k records with and without one 50 MB line (a line is checked while it is read, never held whole: the
run with it must stay within 1.5x of the run without it).

    .venv/bin/python benchmarks/validate_throughput.py [--n 1000] [--repeats 3]
    .venv/bin/python benchmarks/validate_throughput.py --only-big-line [--n 200]

Measured (2 cores at load average ~20): 30 records/s with 1 worker, 28 with 2 (0.95x); peak RSS 531 MiB at
1k and at 10k records (ratio 1.00). ``--only-big-line --n 200`` (load average ~11): 496 MiB for 200 records,
524 MiB with one 50 MB line added (ratio 1.06; before bounded reading that line alone took 14.2 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from timing import interleaved

from docev.assets import init_checkpoint
from docev.config import load_config
from docev.synth import synth_data
from docev.validate.runner import run_validate, validate_dir

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _cfg(work: Path, ckpt: Path, source: Path, tag: str):
    datasets = json.dumps([{"source": str(source), "name": "bench"}])
    return load_config(CONFIG, [f"output_dir={work / tag}", f"tokenizer.model_name_or_path={ckpt}",
                                "synthetic=null", f"datasets={datasets}", "validate.thumbnails=0"])  # fmt: skip


def _replicate(src: Path, dst: Path, copies: int) -> Path:
    """``copies`` × the records of ``src`` with fresh ids, pointing at the same images (grows the input, not disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "images", dst / "images", copy_function=os.link)  # hard links stay inside the root
    lines = (src / "data.jsonl").read_text().splitlines()
    with (dst / "data.jsonl").open("w") as fh:
        for c in range(copies):
            for line in lines:
                rec = json.loads(line)
                rec["id"] = f"{rec['id']}-{c}"
                fh.write(json.dumps(rec) + "\n")
    return dst


def _with_big_line(src: Path, dst: Path, megabytes: int) -> Path:
    """The records of ``src`` plus one line of ``megabytes`` MB (a record whose answer is that long)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "images", dst / "images", copy_function=os.link)
    shutil.copyfile(src / "data.jsonl", dst / "data.jsonl")
    record = {"id": "huge", "context": [{"role": "user", "content": "Total?"}, {"role": "assistant", "content": ""}]}
    head, tail = json.dumps(record).encode().split(b'""')
    with (dst / "data.jsonl").open("ab") as fh:
        fh.write(head + b'"')
        for _ in range(megabytes):
            fh.write(b"x" * (1 << 20))
        fh.write(b'"' + tail + b"\n")
    return dst


def _big_line(work: Path, ckpt: Path, source: Path, n: int) -> None:
    big = _with_big_line(source, work / "data-bigline", 50)
    rss = _child_peak_rss(work, ckpt, source, "rss-plain")
    rss_big = _child_peak_rss(work, ckpt, big, "rss-bigline")
    print(f"peak RSS: {n} records {rss:.0f} MiB, {n} records + one 50 MB line {rss_big:.0f} MiB "
          f"(ratio {rss_big / rss:.2f}, limit 1.5)")  # fmt: skip


def _child_peak_rss(work: Path, ckpt: Path, source: Path, tag: str) -> float:
    """Validate in a fresh process and return its peak RSS in MiB (each size measured on its own)."""
    cmd = [sys.executable, __file__, "--child", str(work), str(ckpt), str(source), tag]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--only-big-line", action="store_true", help="only the 50 MB line's peak RSS")
    args = parser.parse_args()
    if args.child:
        work, ckpt, source, tag = args.child
        run_validate(_cfg(Path(work), Path(ckpt), Path(source), tag), workers=1)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = init_checkpoint(work / "ckpt")
        source = synth_data(work / "data", args.n, seed=0)["instruct"]
        if args.only_big_line:
            _big_line(work, ckpt, source, args.n)
            return
        cfgs = {workers: _cfg(work, ckpt, source, f"w{workers}") for workers in (1, 2)}
        runs = {workers: partial(run_validate, cfg, workers=workers) for workers, cfg in cfgs.items()}

        def clean() -> None:
            for cfg in cfgs.values():
                shutil.rmtree(validate_dir(cfg), ignore_errors=True)

        timed = interleaved(runs, args.repeats, before=clean)
        rates = {}
        for workers, t in timed.items():
            read = t.result["sources"]["bench"]["read"]
            rates[workers] = read / t.median
            print(f"workers={workers}: {read} records in {t.median:.1f}s (median of {args.repeats}) "
                  f"= {rates[workers]:.0f} records/s")  # fmt: skip
        print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
        big = _replicate(source, work / "data10x", 10)
        rss1 = _child_peak_rss(work, ckpt, source, "rss1k")
        rss10 = _child_peak_rss(work, ckpt, big, "rss10k")
        print(f"peak RSS: {args.n} records {rss1:.0f} MiB, {10 * args.n} records {rss10:.0f} MiB "
              f"(ratio {rss10 / rss1:.2f})")  # fmt: skip
        _big_line(work, ckpt, source, args.n)


if __name__ == "__main__":
    main()
