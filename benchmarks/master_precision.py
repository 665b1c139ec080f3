"""Pure bf16 vs fp32 master weights against an fp32 run: tiny DocEV, 2 CPU ranks (`docev train`), ~20 steps.

Three runs per learning rate, from the same base and on the same batches:
``fp32`` (dtype fp32, master fp32: the reference), ``mixed`` (dtype bf16, master_dtype fp32) and ``bf16``
(dtype bf16, master_dtype bf16: torchtune's default, everything in bf16). For each it prints the loss
curve's distance from the fp32 run (max and mean |Δloss| over the steps) and what became of the fp32
run's weight update on the decoder layers: the share of it the run reproduced (the projection
<Δw, Δw_fp32> / |Δw_fp32|², 1 = all of it), the cosine between the updates, and the share of elements
that moved at all. Δw is taken against the base as each run holds it (bf16-rounded for ``bf16``).

    .venv/bin/python benchmarks/master_precision.py [--steps 20] [--lr 1e-5 1e-4] [--records 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIG, _base, _env, _out  # noqa: E402

RUNS = {"fp32": ("fp32", "fp32"), "mixed": ("bf16", "fp32"), "bf16": ("bf16", "bf16")}  # name: (dtype, master)
LAYERS = "language_model.model.layers."


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update({k: v.float() for k, v in load_file(str(f)).items() if k.startswith(LAYERS)})
    return out


def _run(base: Path, name: str, data_args: list[str], steps: int, lr: float, dtype: str, master: str) -> dict:
    from docev.run.checkpoints import latest_checkpoint
    from docev.training.metrics_log import read_metrics

    out = _out(base, name)
    args = [f"output_dir={out}", *data_args, "epochs=50", f"stop_after_steps={steps}", "save_every_n_steps=100000",
            "lr_scheduler.num_warmup_steps=2", f"optimizer.lr={lr}", f"dtype={dtype}", f"master_dtype={master}",
            "keep_last_n_checkpoints=1", "checkpoint_format=hf"]  # fmt: skip
    cmd = [sys.executable, "-m", "docev.cli", "train", "--config", str(CONFIG), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if done.returncode:
        raise SystemExit(f"{name}: docev train failed\n{done.stderr[-4000:]}")
    losses = [r["loss"] for r in read_metrics(out / "logs" / "metrics.jsonl")]
    return {"losses": losses, "weights": _weights(latest_checkpoint(out / "checkpoints"))}


def main() -> None:
    from docev.assets import init_checkpoint
    from docev.synth import synth_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4])
    parser.add_argument("--records", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = init_checkpoint(work / "ckpt", size="tiny", seed=0)
        sources = synth_data(work / "synth", args.records, seed=3, fmt="jsonl", workers=1)
        datasets = [{"source": str(sources["instruct"]), "name": "instruct"},
                    {"source": str(sources["pretrain"]), "name": "pretrain", "ufx_type": "pretrain",
                     "context_col": "text", "weight": 0.25}]  # fmt: skip
        base, data_args = _base(work, "base", ckpt, datasets)
        initial = _weights(ckpt)
        print(f"tiny DocEV, 2 CPU ranks, {args.steps} steps, warmup 2; Δw over the decoder layers "
              f"({sum(v.numel() for v in initial.values())} elements)")  # fmt: skip
        for lr in args.lr:
            res = {n: _run(base, f"{n}-{lr:g}", data_args, args.steps, lr, *dt) for n, dt in RUNS.items()}
            ref = res["fp32"]
            ref_update = torch.cat([(ref["weights"][k] - initial[k]).flatten() for k in initial])
            print(f"\nlr {lr:g}")
            print("| run | final loss | max abs Δloss vs fp32 | mean abs Δloss | fp32 update reproduced | cosine | "
                  "elements moved |\n|---|---:|---:|---:|---:|---:|---:|")  # fmt: skip
            for name, (_, master) in RUNS.items():
                r = res[name]
                held = {k: v.to(torch.bfloat16).float() if master == "bf16" else v for k, v in initial.items()}
                update = torch.cat([(r["weights"][k] - held[k]).flatten() for k in initial])
                diffs = [abs(a - b) for a, b in zip(r["losses"], ref["losses"], strict=True)]
                kept = float(update @ ref_update / (ref_update @ ref_update))
                cos = float(torch.nn.functional.cosine_similarity(update, ref_update, dim=0))
                moved = float((update != 0).float().mean())
                print(f"| {name} | {r['losses'][-1]:.4f} | {max(diffs):.2e} | {sum(diffs) / len(diffs):.2e} | "
                      f"{kept:.3f} | {cos:.3f} | {moved:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
