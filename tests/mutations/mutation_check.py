"""Mutation check: each mutation below is a bug that the suite once let through (issue 27); applied to a temporary
copy of the repository, it must make the named tests fail.

    python tests/mutations/mutation_check.py              # all, ~15-25 min on 2 cores (torchrun runs)
    python tests/mutations/mutation_check.py --only eval-scores-empty-prediction
    python tests/mutations/mutation_check.py --list

For each mutation: copy the tracked files (``git ls-files``) to a temporary folder, replace the ``old`` text of
one file (it must occur exactly once) by ``new``, run ``pytest`` on the named tests there with that copy's
``src`` first on ``PYTHONPATH`` (torchrun children inherit it), and require a failing test under every named
target — a collection error or an interrupted run stops the check instead of counting as a kill. Prints the
first assertion lines, so a kill for the wrong reason (a timeout) shows. Exits 1 when any mutation survives.
Not part of ``make test`` (it retrains several models); run it when changing these tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    Mutation(
        "peft-base-rolled",
        "src/docev/training/peft.py",
        "        adapters = set(get_adapter_params(model))\n",
        "        adapters = set(get_adapter_params(model))\n"
        "        state_dict = {k: v.roll(1, 0) if k.startswith('decoder.') and 'lora_' not in k else v\n"
        "                      for k, v in state_dict.items()}\n",
        (
            "tests/training/test_peft.py::test_fresh_adapters_start_from_the_full_models_loss",
            "tests/training/test_qlora.py",
        ),  # fmt: skip
        "every decoder base weight shifted by one row before an adapter run loads it",
    ),
    Mutation(
        "recipe-hybrid-off",
        "src/docev/training/recipe.py",
        "mesh = run_mesh(cfg.train.fsdp_strategy, ",
        'mesh = run_mesh("full", ',
        (
            "tests/training/test_recipe.py::test_hybrid_sharding_with_cross_node_reduction_and_a_dcp_resume_on_the_2d_mesh",
        ),
        "the recipe always shards over every rank (hybrid switched off)",
    ),
    Mutation(
        "eval-scores-empty-prediction",
        "src/docev/evaluation/evaluate.py",
        "s = score(pred, q.answers, threshold)",
        's = score("", q.answers, threshold)',
        ("tests/evaluation/test_evaluate.py",),
        "evaluation scores an empty answer instead of the model's",
    ),
    Mutation(
        "flex-window-of-one-block",
        "src/docev/models/docev/_attention.py",
        "return (q_idx >= kv_idx) & (document_ids",
        "return (q_idx >= kv_idx) & (q_idx - kv_idx < 128) & (document_ids",
        ("tests/models/docev/test_attention.py::test_flex_matches_dense_on_packed_rows_including_the_loss",),
        "flex's mask only sees keys within 128 tokens (right inside one block, wrong across blocks)",
    ),
    Mutation(
        "hybrid-root-gradients-doubled",
        "src/docev/training/parallelize.py",
        "    fully_shard(model, reshard_after_forward=False, ignored_params=set(frozen) or None, **kwargs)\n",
        "    fully_shard(model, reshard_after_forward=False, ignored_params=set(frozen) or None, **kwargs)\n"
        "    if mesh is not None and mesh.ndim == 2:\n"
        "        model.set_gradient_divide_factor(mesh.size() / 2)\n",
        ("tests/training/test_sharding.py::test_hybrid_losses_and_gradient_norms_equal_full_sharding",),
        "hybrid sharding divides the root's gradients by half the world (AdamW's sign-like steps hide it)",
    ),
    Mutation(
        "ordered-map-serial",
        "src/docev/storage.py",
        "    if threads <= 1:\n        for item in items:",
        "    if threads >= 1:\n        for item in items:",
        ("tests/test_storage.py::test_ordered_map_keeps_order_bounds_work_and_passes_errors_through",),
        "ordered_map runs one call at a time",
    ),
    Mutation(
        "ordered-map-reads-whole-stream",
        "src/docev/storage.py",
        "        for item in items:\n            pending.append(",
        "        for item in list(items):\n            pending.append(",
        ("tests/test_storage.py::test_ordered_map_keeps_order_bounds_work_and_passes_errors_through",),
        "ordered_map reads its whole input before handing out the first result",
    ),
    Mutation(
        "adapter-save-publishes-first",
        "src/docev/models/docev/_checkpointer.py",
        '        model = {k: v.contiguous() for k, v in state_dict["model"].items()}\n'
        '        save_file(model, str(tmp / TRAINED_FILE), metadata={"format": "pt"})\n',
        '        model = {k: v.contiguous() for k, v in state_dict["model"].items()}\n'
        '        latest = self.output_dir / "latest"\n'
        "        before = latest.read_text() if latest.exists() else None\n"
        '        latest.write_text(f"step_{step}\\n")  # optimistic, put back if the write fails\n'
        "        try:\n"
        '            save_file(model, str(tmp / TRAINED_FILE), metadata={"format": "pt"})\n'
        "        except BaseException:\n"
        "            if before is not None:\n"
        "                latest.write_text(before)\n"
        "            raise\n",
        ("tests/training/test_peft_checkpoint.py::test_a_save_killed_midway_keeps_the_previous_folder",),
        "an adapter save points latest at the new step first and relies on an except clause to put it back",
    ),
]


def _copy_repo(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    for raw in filter(None, listed):
        rel = raw.decode()
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def check(m: Mutation, python: str) -> tuple[bool, float, str]:
    """(killed, seconds, the tail of pytest's output) for one mutation."""
    with tempfile.TemporaryDirectory(prefix=f"mutation-{m.name}-") as tmp:
        repo = Path(tmp) / "repo"
        _copy_repo(repo)
        target = repo / m.path
        text = target.read_text()
        if text.count(m.old) != 1:
            raise SystemExit(f"{m.name}: the text to mutate occurs {text.count(m.old)} times in {m.path}")
        target.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), os.environ.get("PYTHONPATH", "")])}
        where = subprocess.run([python, "-c", "import docev; print(docev.__file__)"], cwd=repo, env=env,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        if not where.startswith(str(repo)):
            raise SystemExit(f"{m.name}: the copy's package is not the one imported ({where})")
        start = time.perf_counter()
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *m.tests], cwd=repo,
                              env=env, capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
    lines = proc.stdout.splitlines()
    why = list(dict.fromkeys(x[:200] for x in lines if x.startswith("E ") and x[1:].strip()))[:3]  # not a timeout
    tail = "\n".join(
        [*why, *(x for x in lines if x.startswith(("FAILED", "ERROR")) or " passed" in x or " failed" in x)]
    )
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{m.name}: pytest exited {proc.returncode} (not a test failure):\n{proc.stdout[-3000:]}")
    failed = [x.split()[1] for x in lines if x.startswith("FAILED ")]
    return all(any(f.startswith(t) for f in failed) for t in m.tests), seconds, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="a mutation's name (repeatable)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list or not chosen:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.path}: {m.why}")
        return 0 if args.list else 2
    survived = []
    for m in chosen:
        killed, seconds, tail = check(m, sys.executable)
        print(f"{'killed  ' if killed else 'SURVIVED'} {m.name} ({seconds:.0f} s): {m.why}")
        print("    " + tail.replace("\n", "\n    "), flush=True)
        if not killed:
            survived.append(m.name)
    print(
        f"{len(chosen) - len(survived)} of {len(chosen)} mutations killed", *(["survived:", *survived] * bool(survived))
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
