"""``docev`` command line: every pipeline step, each taking ``--config FILE`` plus ``key.sub=value``
overrides (torchtune style, anywhere on the line). Config problems exit 2 with one line per problem; a
missing prerequisite (``docev.preflight``) exits 3 with one line naming the command that makes it; a
storage fault that outlasted its retries exits 75 (EX_TEMPFAIL: rerunning may succeed) naming the path."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docev.config import ConfigError, json_schema, load_config

TRANSIENT_EXIT = 75  # sysexits' EX_TEMPFAIL: a transient fault outlasted the retries; a rerun may succeed


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def cmd_config_validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.overrides)
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_init_checkpoint(args: argparse.Namespace) -> int:
    from docev.assets import init_checkpoint

    out = init_checkpoint(args.out, size=args.size, seed=args.seed)
    print(f"tiny DocEV checkpoint written to {out}")
    return 0


def cmd_synth_data(args: argparse.Namespace) -> int:
    from docev.synth import synth_data

    sources = synth_data(Path(args.out), args.n, seed=args.seed, fmt=args.format, workers=args.workers)
    for kind, root in sources.items():
        print(f"{kind}: {root}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from docev.outputs import outputs
    from docev.preflight import require
    from docev.run.paths import VALIDATE_REPORTS
    from docev.validate.runner import ValidationFailed, merge, run_shard

    cfg = load_config(args.config, args.overrides)
    require(cfg, "validate")
    try:
        if args.merge:
            report = merge(cfg, args.merge)
        else:
            shard, num = _parse_shard(args.shard)
            run_shard(cfg, shard, num, args.workers)
            if num > 1:
                print(f"shard {shard}/{num} written; run `docev validate --merge {num}` when all shards are done")
                return 0
            report = merge(cfg, 1)
    except ValidationFailed as exc:
        print(f"validate failed: {exc}", file=sys.stderr)
        return 1
    for name, s in report["sources"].items():
        print(f"{name}: read {s['read']}, accepted {s['accepted']}, rejected {s['rejected']}")
    print(f"report: {outputs(cfg).where(VALIDATE_REPORTS['md'])}")
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit()) or not int(i) < int(n):
        raise ConfigError([f"--shard {text!r}: expected i/n with 0 <= i < n (e.g. 0/4)"])
    return int(i), int(n)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from docev.data.preprocess import merge_all, run_shards, shards_location, splits_to_build
    from docev.outputs import outputs
    from docev.preflight import require
    from docev.run.paths import shards_manifest_key
    from docev.sources.fingerprints import SourceChanged

    cfg = load_config(args.config, args.overrides)
    require(cfg, "preprocess")
    if not args.merge:
        shard, num = _parse_shard(args.shard)
        for split in splits_to_build(cfg):
            try:
                built = run_shards(cfg, shard, num, args.workers, split)
            except SourceChanged as exc:
                print(f"preprocess failed: {exc}", file=sys.stderr)
                return 1
            print(f"built {len(built)} shard(s) in {shards_location(cfg, split)}")
        if num > 1:
            print(f"shard {shard}/{num} done; run `docev preprocess --merge` when all are done")
            return 0
    manifest = merge_all(cfg)
    n, where = manifest["eval_samples"], shards_location(cfg, "eval")
    held = f"; {n} held out in {where}" if n else ""
    shards = f"{len(manifest['shards'])} shards: {outputs(cfg).where(shards_manifest_key())}"
    print(f"{manifest['total_samples']} samples in {shards}{held}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from docev.preflight import require
    from docev.training.launch import torchrun_argv

    cfg = load_config(args.config, args.overrides)
    require(cfg, "train")
    argv = torchrun_argv(cfg, args.config, args.overrides)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the torchrun launcher takes over the process: signals and exit status are its own


def cmd_tokens(args: argparse.Namespace) -> int:
    from docev.vision.geometry import num_image_tokens, plan_tiles

    tok = load_config(args.config, args.overrides).tokenizer
    geometry = {"tile_size": tok.tile_size, "patch_size": tok.patch_size,
                "min_num_tiles": tok.min_num_tiles, "max_num_tiles": tok.max_num_tiles}  # fmt: skip
    for h, w in args.size:
        plan = plan_tiles(h, w, tok.tile_size, tok.min_num_tiles, tok.max_num_tiles)
        tokens = {str(r): num_image_tokens(h, w, r, **geometry) for r in tok.sampling_ratio}
        print(json.dumps({"height": h, "width": w, "canvas": list(plan.canvas), "grid": list(plan.grid),
                          "tiles": plan.num_tiles, "tokens": tokens}))  # fmt: skip
    return 0


def _size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH in pixels, e.g. 3508x2480")
    return int(h), int(w)


def cmd_run(args: argparse.Namespace) -> int:
    from docev.pipeline.local import ensure_assets, local_config, run_pipeline_locally
    from docev.preflight import require

    cfg = local_config(args.config, args.overrides)
    params = _params(args.param)
    ensure_assets(cfg)
    require(cfg, "pipeline")  # seconds here, instead of a failed first task after kfp.local has started
    try:
        outputs = run_pipeline_locally(cfg, params)
    except RuntimeError as exc:  # kfp.local: a task failed; the tail of its log is printed above
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    from docev.evaluation.report import LABELS, metric_table
    from docev.run.paths import run_paths

    paths = run_paths(cfg)
    results = {k: json.loads(paths.eval_file(k, "metrics.json").read_text()) for k in LABELS
               if paths.eval_file(k, "metrics.json").is_file()}  # fmt: skip
    if any(m.get("n") for m in results.values()):
        print("\nheld-out evaluation:")
        print("\n".join(f"  {line}" for line in metric_table(results)))
    print("\npipeline finished; outputs:")
    for name, path in outputs.items():
        print(f"  {name:26s} {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from docev.pipeline.submit import HostUnreachable, submit

    cfg = load_config(args.config, args.overrides)
    try:
        done = submit(cfg, experiment=args.experiment, params=_params(args.param), host=args.host,
                      existing_token=args.existing_token)  # fmt: skip
    except HostUnreachable as exc:
        print(f"docev submit: {exc}", file=sys.stderr)
        return 1
    what = "reused" if done.version_reused else "uploaded"
    print(f"pipeline version {done.version_id} ({what}); run {done.run_id}")
    print(done.url)
    return 0


def _params(items: list[str]) -> dict[str, str]:
    """``--param name=value`` run parameters (the knobs of the compiled pipeline)."""
    from docev.pipeline.params import KNOBS

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in KNOBS:
            raise ConfigError([f"--param {item!r}: expected NAME=VALUE with NAME one of {', '.join(KNOBS)}"])
        out[name] = KNOBS[name][1](value) if KNOBS[name][1] is not str else value
    return out


def cmd_render_manifests(args: argparse.Namespace) -> int:
    from docev.k8s.admission import manifest_errors
    from docev.k8s.meta import to_yaml
    from docev.k8s.pod import save_grace_warning
    from docev.k8s.pytorchjob import render_pytorchjob
    from docev.k8s.trainjob import render_runtime, render_trainjob

    cfg = load_config(args.config, args.overrides)
    backend = args.backend or (cfg.train.backend if cfg.train.backend != "local" else "kubernetes")
    if args.runtime_out and backend != "trainjob":
        raise ConfigError(["--runtime-out: the ClusterTrainingRuntime belongs to --backend trainjob"])
    config_path = args.config_path or f"{cfg.kubernetes.mount_path}/configs/{Path(args.config).name}"
    render = render_trainjob if backend == "trainjob" else render_pytorchjob
    try:
        job = render(cfg, name=args.name, config_path=config_path, overrides=args.overrides)
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError([f"--name: {exc}"]) from None
    runtime = render_runtime(cfg) if backend == "trainjob" else None
    rejected = [f"{job['kind']} {args.name}: {e}" for e in manifest_errors(job, runtime)]
    if runtime is not None:
        rejected += [f"ClusterTrainingRuntime {runtime['metadata']['name']}: {e}" for e in manifest_errors(runtime)]
    if rejected:  # checked before anything is written: a half-written pair would be applied by someone
        raise ConfigError(
            [f"{args.config}: the cluster would reject what this config renders (nothing written):"] + rejected
        )
    warning = save_grace_warning(cfg)
    if warning:
        print(f"docev render-manifests: warning: {warning}", file=sys.stderr)
    if not args.out and not args.runtime_out:
        sys.stdout.write(to_yaml(job))
        return 0
    command = ["docev render-manifests --config", args.config]
    command += [f"--backend {backend}"] if args.backend else []
    command += [f"--out {args.out}"] if args.out else []
    command += [f"--runtime-out {args.runtime_out}"] if args.runtime_out else []
    command += [f"--config-path {args.config_path}"] if args.config_path else []
    command += [f"--name {args.name}"] if args.name != "docev-train" else []
    generated = f"# Generated by:\n#   {' '.join(command + args.overrides)}\n"
    regenerate = "# Edit the config and regenerate (make manifests) rather than this file.\n"
    if args.out:
        kind = job["kind"]
        header = f"{generated}# The training step as a standalone {kind} reading its config from {config_path}.\n"
        if kind == "TrainJob":
            header += f"# Needs Kubeflow Trainer v2.2 or later and the ClusterTrainingRuntime {cfg.train.runtime}.\n"
        out = Path(args.out) / f"{kind.lower()}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + regenerate + to_yaml(job))
        print(f"{kind} {job['metadata']['namespace']}/{args.name} written to {out}")
    if args.runtime_out:
        header = (
            f"{generated}# The ClusterTrainingRuntime that TrainJobs of this config reference (cluster-scoped;\n"
            "# Kubeflow Trainer v2.2 or later).\n"
        )
        out = Path(args.runtime_out) / "clustertrainingruntime.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(header + regenerate + to_yaml(runtime))
        print(f"ClusterTrainingRuntime {runtime['metadata']['name']} written to {out}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="validate a config or print its JSON Schema")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    v = cfg_sub.add_parser("validate", help="print the resolved config, or the errors (exit 2)")
    v.add_argument("file")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(func=cmd_config_validate)
    cfg_sub.add_parser("schema", help="print the config's JSON Schema").set_defaults(func=cmd_config_schema)

    ic = sub.add_parser("init-checkpoint", help="write a tiny DocEV HF checkpoint with a local tokenizer")
    ic.add_argument("--size", default="tiny", choices=["tiny"])
    ic.add_argument("--out", required=True)
    ic.add_argument("--seed", type=int, default=0)
    ic.set_defaults(func=cmd_init_checkpoint)

    sd = sub.add_parser("synth-data", help="render synthetic UFX documents")
    sd.add_argument("--out", required=True)
    sd.add_argument("--n", type=int, default=100)
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--format", choices=["jsonl", "parquet", "hf"], default="jsonl")
    sd.add_argument("--workers", type=int, default=2)
    sd.set_defaults(func=cmd_synth_data)

    val = sub.add_parser("validate", help="validate UFX sources: manifest of accepted records, rejects, report")
    _config_args(val)
    val.add_argument("--workers", type=int, default=None, help="processes (default: validate.workers)")
    val.add_argument("--shard", default="0/1", help="validate only shard i of n (KFP fan-out)")
    val.add_argument("--merge", type=int, default=0, metavar="N", help="merge the outputs of N shards")
    val.set_defaults(func=cmd_validate)

    pre = sub.add_parser("preprocess", help="validated records -> tiled, tokenized Arrow shards + manifest.json")
    _config_args(pre)
    pre.add_argument("--workers", type=int, default=None, help="processes (default: preprocess.workers)")
    pre.add_argument("--shard", default="0/1", help="build only shards k with k %% n == i (KFP fan-out)")
    pre.add_argument("--merge", action="store_true", help="check every shard and write manifest.json")
    pre.set_defaults(func=cmd_preprocess)

    tr = sub.add_parser("train", help="fine-tune under torchrun (train.nnodes x train.nproc_per_node processes)")
    _config_args(tr)
    tr.set_defaults(func=cmd_train)

    tk = sub.add_parser("tokens", help="what a page costs: canvas, tiles and image tokens per sampling ratio")
    _config_args(tk)
    tk.add_argument("--size", type=_size, action="append", required=True, metavar="HxW", help="image size (repeat)")
    tk.set_defaults(func=cmd_tokens)

    run = sub.add_parser("run", help="run the whole KFP pipeline locally (kfp.local, torchrun on CPU)")
    _config_args(run)
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a run parameter, as edited in the KFP UI (learning_rate, epochs, max_steps_per_epoch, "
                     "num_nodes, gpus_per_node, resume)")  # fmt: skip
    run.set_defaults(func=cmd_run)

    sb = sub.add_parser("submit", help="validate + compile + upload (or reuse) the pipeline + create a KFP run")
    _config_args(sb)
    sb.add_argument(
        "--host", default=None, help="KFP API endpoint (default: KFP_HOST, then KF_PIPELINES_ENDPOINT; required)"
    )
    sb.add_argument("--experiment", required=True)
    sb.add_argument("--existing-token", default=None, help="bearer token (else kfp.Client's usual sources)")
    sb.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a run parameter")
    sb.set_defaults(func=cmd_submit)

    rm = sub.add_parser(
        "render-manifests", help="write the training step as a standalone PyTorchJob or TrainJob (+ runtime) YAML"
    )
    _config_args(rm)
    rm.add_argument(
        "--backend",
        choices=["kubernetes", "trainjob"],
        help="kubernetes: a Training Operator PyTorchJob; trainjob: a Kubeflow Trainer v2 TrainJob "
        "(default: train.backend when it is one of these, else kubernetes)",
    )
    rm.add_argument("--out", help="folder for pytorchjob.yaml / trainjob.yaml (default: print to stdout)")
    rm.add_argument("--runtime-out", help="folder for the ClusterTrainingRuntime, clustertrainingruntime.yaml")
    rm.add_argument(
        "--config-path", help="where the pods read the config (default: <kubernetes.mount_path>/configs/<file name>)"
    )
    rm.add_argument("--name", default="docev-train", help="job name (DNS-1035, at most 48 chars)")
    rm.set_defaults(func=cmd_render_manifests)

    ex = sub.add_parser("export", help="a checkpoint -> verified HF model folder with SHA256SUMS and a model card")
    _config_args(ex)
    ex.add_argument("--checkpoint", help="latest, best, step_N, base, or a folder (default: export.checkpoint)")
    ex.add_argument("--out", help="folder or fsspec URI (default: export.destination, else <output_dir>/export)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing export (swapped in whole)")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("evaluate", help="answer the held-out questions; ANLS, exact match, field F1")
    _config_args(ev)
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
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, taking ``key=value`` overrides anywhere on the line (after options too), in their order."""
    args, extra = parser.parse_known_args(argv)
    strays = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if strays:
        parser.parse_args(argv)  # argparse's own message and exit 2 for what is neither an option nor an override
    if extra:
        ordered = [a for a in argv if a in set(args.overrides) | set(extra)]
        args.overrides = [a for a in ordered if "=" in a and not a.startswith("-")]
    return args


def main(argv: list[str] | None = None) -> int:
    from docev.preflight import PREFLIGHT_EXIT, PreflightError
    from docev.storage import TransientStorageError

    args = _parse(build_parser(), sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print("config error:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    except TransientStorageError as exc:
        print(f"docev {args.command} failed: {exc}; a transient storage fault, rerun the step", file=sys.stderr)
        return TRANSIENT_EXIT
    except PreflightError as exc:
        for line in exc.problems:
            print(f"docev {args.command}: {line}", file=sys.stderr)
        return PREFLIGHT_EXIT


if __name__ == "__main__":
    sys.exit(main())
