"""``docev`` commands about the model: ``train`` (under torchrun), ``checkpoint verify``, ``plan-memory``,
``export``, ``evaluate``, ``generate``. Each imports the training or inference stack only when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docev.cli.args import config_args
from docev.config import load_config


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from docev.preflight import require
    from docev.training.launch import torchrun_argv

    cfg = load_config(args.config, args.overrides)
    require(cfg, "train")
    argv = torchrun_argv(cfg, args.config, args.overrides)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the torchrun launcher takes over the process: signals and exit status are its own


def cmd_export(args: argparse.Namespace) -> int:
    from docev.export import ChecksumError, ExportError, export_checkpoint

    cfg = load_config(args.config, args.overrides)
    try:
        result = export_checkpoint(cfg, args.checkpoint, args.out, overwrite=args.overwrite or None)
    except (ExportError, ChecksumError, FileNotFoundError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 1
    print(f"exported {result.checkpoint} ({result.dtype}) to {result.destination} ({len(result.checksums)} files)")
    if result.smoke is not None:
        print(f"smoke generation: {result.smoke.text!r}")
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    """Recompute a step folder's digests and check its recipe state; exit 1 naming each file that differs."""
    import torch

    from docev.run.checkpoints import RECIPE_STATE, CheckpointError, resolve_checkpoint
    from docev.run.digests import CheckpointCorrupt, verify_checkpoint
    from docev.training.state import recipe_problems

    which, overrides = args.which, list(args.overrides)
    if which and "=" in which:  # no folder given, only overrides
        which, overrides = None, [which, *overrides]
    which = which or "latest"
    try:
        if Path(which).is_dir():
            folder = Path(which)
        elif args.config is None:
            print(f"checkpoint verify {which}: pass --config to find it under checkpointer.output_dir", file=sys.stderr)
            return 2
        else:
            folder = resolve_checkpoint(load_config(args.config, overrides), which)
        manifest = verify_checkpoint(folder, required=True)
        if (folder / RECIPE_STATE).is_file():
            problems = recipe_problems(folder, torch.load(folder / RECIPE_STATE, weights_only=True), manifest)
            if problems:
                raise CheckpointCorrupt(folder, problems)
    except (CheckpointError, CheckpointCorrupt) as exc:
        print(f"checkpoint verify failed: {exc}", file=sys.stderr)
        return 1
    files = manifest["files"]
    print(f"{folder}: step {manifest['step']}, {len(files)} files, {sum(f['size'] for f in files.values())} bytes "
          f"verified ({manifest['hash']})")  # fmt: skip
    return 0


def cmd_plan_memory(args: argparse.Namespace) -> int:
    from docev.training.memory import check_fits, config_setup, format_plans, gpu_memory_gib, plan

    cfg = load_config(args.config, args.overrides)
    nnodes = args.nnodes or cfg.train.nnodes
    gpus = args.gpus_per_node or cfg.train.nproc_per_node
    plans = plan(cfg, nnodes, gpus)
    if args.json:
        print(json.dumps([p.as_dict() for p in plans], indent=2))
    else:
        print(format_plans(plans, cfg))
    gib = args.gpu_memory_gib or gpu_memory_gib(cfg)
    if gib is None:
        return 0
    own = next(p for p in plans if p.setup == config_setup(cfg))
    try:
        check_fits(cfg, own, gib, nnodes=nnodes, gpus_per_node=gpus)
    except ValueError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from docev.inference import DocEVGenerator
    from docev.inference.generate import NO_TEXT

    try:
        generator = DocEVGenerator(args.model, device=args.device, adapter=args.adapter)
        result = generator.generate(args.image, args.prompt, max_new_tokens=args.max_new_tokens,
                                    sampling_ratio=args.sampling_ratio)  # fmt: skip
    except (FileNotFoundError, ValueError) as exc:
        print(f"generate failed: {exc}", file=sys.stderr)
        return 1
    print(result.text if result.text or not result.stopped else NO_TEXT)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from docev.evaluation.evaluate import evaluate
    from docev.evaluation.report import write_report
    from docev.preflight import require
    from docev.run.checkpoints import CheckpointError

    cfg = load_config(args.config, args.overrides)
    require(cfg, "evaluate")
    with tqdm(unit="q", desc="evaluate", disable=None, mininterval=1.0) as bar:
        try:
            m = evaluate(cfg, model_dir=args.model, checkpoint=args.checkpoint, label=args.label, progress=bar.update)
        except (CheckpointError, FileNotFoundError, ValueError) as exc:
            print(f"evaluate failed: {exc}", file=sys.stderr)
            return 1
    report = write_report(cfg, m["label"])  # against eval/base when it exists, as the pipeline's
    f1 = f", field F1 {m['f1']:.3f}" if "f1" in m else ""
    print(f"{m['label']}: {m['n']} questions, ANLS {m['anls']:.3f}, exact match {m['exact_match']:.3f}{f1} "
          f"({m['answers_per_second']:.1f} answers/s): {report.parent} (report.html, report.md)")  # fmt: skip
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The training, checkpoint and model-use subcommands."""
    tr = sub.add_parser("train", help="fine-tune under torchrun (train.nnodes x train.nproc_per_node processes)")
    config_args(tr)
    tr.set_defaults(func=cmd_train)

    ex = sub.add_parser("export", help="a checkpoint -> verified HF model folder with SHA256SUMS and a model card")
    config_args(ex)
    ex.add_argument("--checkpoint", help="latest, best, step_N, base, or a folder (default: export.checkpoint)")
    ex.add_argument("--out", help="folder or fsspec URI (default: export.destination, else <output_dir>/export)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export (swapped in whole)")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("evaluate", help="answer the held-out questions; ANLS, exact match, field F1")
    config_args(ev)
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model folder (an export); default: --checkpoint latest")
    which.add_argument("--checkpoint", help="latest, best, step_N or base (under checkpointer.output_dir)")
    ev.add_argument("--label", help="results go to <output_dir>/eval/<label> (default: base or tuned)")
    ev.set_defaults(func=cmd_evaluate)

    ck = sub.add_parser("checkpoint", help="operate on training checkpoints")
    ck_sub = ck.add_subparsers(dest="checkpoint_command", required=True)
    cv = ck_sub.add_parser("verify", help="recompute a checkpoint's digests; exit 1 naming each file that differs")
    cv.add_argument("which", nargs="?", help="latest (default), best, step_N (need --config) or a folder")
    cv.add_argument("--config", help="YAML config file (finds latest/best/step_N under checkpointer.output_dir)")
    cv.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    cv.set_defaults(func=cmd_checkpoint_verify)

    pm = sub.add_parser("plan-memory", help="per-GPU bytes of full / LoRA / QLoRA training, counted on meta models")
    pm.add_argument("--config", required=True)
    pm.add_argument("--nnodes", type=int, help="default: train.nnodes")
    pm.add_argument("--gpus-per-node", type=int, help="default: train.nproc_per_node")
    pm.add_argument("--json", action="store_true", help="one JSON object per setup (GiB per GPU) instead of the table")
    pm.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="refuse (exit 1) when the config's setup exceeds this; default: from train.resources.gpu_type",
    )
    pm.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    pm.set_defaults(func=cmd_plan_memory)

    gen = sub.add_parser("generate", help="greedy generation from a model folder about one or more images")
    gen.add_argument("--model", required=True, help="an export, a step_N checkpoint or a base checkpoint folder")
    gen.add_argument("--adapter", help="a PEFT LoRA/DoRA adapter folder (an export's adapter/) applied to --model")
    gen.add_argument("--image", action="append", default=[], help="image file (repeat for several pages)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sampling-ratio", type=int, default=2, help="pooling ratio of the image features")
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(func=cmd_generate)
