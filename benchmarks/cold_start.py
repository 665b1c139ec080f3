"""Cold start of the commands that only read a config and of the data steps (their imports, and ``docev validate``
/ ``docev preprocess`` run for real on 8 synthetic records: what a KFP task of them imports, the tokenizer's
loader and the first shard write included), before and after the import diet, in one run.

"before" is this repository at ``--before`` (default: the commit before the diet), exported to a temporary folder
and run with the same interpreter, so both trees see the same packages and the same machine load. Each command
runs in a fresh ``python -X importtime`` (a new process: nothing cached in memory but the OS page cache and the
bytecode caches, which the first, discarded round warms for both), the trees alternating, ``--repeats`` rounds;
medians of the wall time (process start to exit) and of the time ``-X importtime`` counts in imports, and the
heavy modules loaded. A command the ``before`` tree cannot run (an option it did not have yet) shows ``n/a``.

    .venv/bin/python benchmarks/cold_start.py [--repeats 5] [--before REV]

Measured: see the README (Installation, cold start) and docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "ca019a4"  # main before the import diet
WATCHED = ("torch", "torch._dynamo", "torchtune", "torchao", "transformers", "kfp", "kubernetes", "pandas")

PROBE = """
import sys
argv = sys.argv[1:]
if argv[0] == "import":
    __import__(argv[1])
else:
    import contextlib, io
    from docev.cli import main
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
print("loaded:" + ",".join(m for m in {watched!r} if m in sys.modules), file=sys.stderr)
"""

COMMANDS = {
    "docev config validate": ["config", "validate", "configs/tiny.yaml"],
    "docev tokens": ["tokens", "--config", "configs/docev_preview.yaml", "--size", "3508x2480"],
    "docev render-manifests": ["render-manifests", "--config", "configs/docev_preview.yaml"],
    "docev submit --help": ["submit", "--help"],
    "import the validate step": ["import", "docev.validate.runner"],
    "import the preprocess step": ["import", "docev.data.preprocess"],
    "docev validate (8 records)": ["validate", "--workers", "1", "{data_step}"],
    "docev preprocess (8 records)": ["preprocess", "--workers", "1", "{data_step}"],
}


def data_step_args(work: Path) -> list[str]:
    """Config and overrides of a data step on 8 synthetic records and the tiny checkpoint, made in ``work``."""
    from docev.assets import init_checkpoint
    from docev.synth import synth_data

    ckpt = init_checkpoint(work / "ckpt")
    datasets = json.dumps([{"source": str(synth_data(work / "data", 8, seed=0)["instruct"]), "name": "bench"}])
    return ["--config", "configs/tiny.yaml", f"output_dir={work / 'out'}", "synthetic=null",
            f"tokenizer.model_name_or_path={ckpt}", f"datasets={datasets}", "validate.thumbnails=0"]  # fmt: skip


def run(src: Path, argv: list[str], out: Path) -> tuple[float, float, str] | None:
    """(wall seconds, seconds in imports per -X importtime, heavy modules loaded) of one fresh process; None when
    it fails. A data step finds validate's outputs in ``out`` and no shards (removed, untimed)."""
    env = {**os.environ, "PYTHONPATH": str(src), "TQDM_DISABLE": "1"}
    shutil.rmtree(out / "shards", ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE.format(watched=WATCHED), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode:
        return None
    lines = done.stderr.splitlines()
    # top-level imports are the entries without indentation; their cumulative times add up to all import time
    top = [line.split("|") for line in lines if line.startswith("import time:") and "|" in line]
    imports = sum(int(parts[1]) for parts in top[1:] if not parts[2].startswith("  ") and parts[1].strip().isdigit())
    return wall, imports / 1e6, next(line for line in lines if line.startswith("loaded:")).removeprefix("loaded:")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", default=BEFORE, help="git revision measured as 'before'")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src"], capture_output=True,
                                 check=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"before": Path(tmp) / "src", "after": ROOT / "src"}
        data_step = data_step_args(Path(tmp) / "data_step")
        commands = {name: [a for arg in argv for a in (data_step if arg == "{data_step}" else [arg])]
                    for name, argv in COMMANDS.items()}  # fmt: skip
        results: dict[tuple[str, str], list[tuple[float, float, str] | None]] = {}
        for round_ in range(args.repeats + 1):
            for name, argv in commands.items():
                for tree, src in trees.items():
                    sample = run(src, argv, Path(tmp) / "data_step" / "out")
                    if round_:  # round 0 warms the page cache for both trees (and validates for preprocess)
                        results.setdefault((name, tree), []).append(sample)
    print(f"cold start, median of {args.repeats} interleaved rounds, before = {args.before}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"  {'':28s} {'wall before':>11s} {'after':>7s} {'imports before':>15s} {'after':>7s}  heavy modules after")
    for name in COMMANDS:
        before, after = ([s for s in results[(name, tree)] if s is not None] for tree in trees)
        if not after:
            raise RuntimeError(f"{name}: failed in this tree")
        wall = [f"{statistics.median(s[0] for s in r):5.2f} s" if r else "  n/a  " for r in (before, after)]
        imports = [f"{statistics.median(s[1] for s in r):5.2f} s" if r else "  n/a  " for r in (before, after)]
        print(f"  {name:28s} {wall[0]:>11s} {wall[1]:>7s} {imports[0]:>15s} {imports[1]:>7s}  "
              f"{after[-1][2] or '-'} (before: {(before[-1][2] or '-') if before else 'n/a'})")  # fmt: skip


if __name__ == "__main__":
    main()
