"""``docev`` commands that run or hand off the whole pipeline: ``run`` (kfp.local), ``submit`` (a KFP server),
``render-manifests`` (the training step as a standalone PyTorchJob or TrainJob). kfp and the Kubernetes
rendering are imported only when a command runs (``submit --help`` stays cold)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docev.cli.args import config_args
from docev.config import ConfigError, load_config


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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The pipeline subcommands."""
    run = sub.add_parser("run", help="run the whole KFP pipeline locally (kfp.local, torchrun on CPU)")
    config_args(run)
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="a run parameter, as edited in the KFP UI (learning_rate, epochs, max_steps_per_epoch, "
                     "num_nodes, gpus_per_node, resume)")  # fmt: skip
    run.set_defaults(func=cmd_run)

    sb = sub.add_parser("submit", help="validate + compile + upload (or reuse) the pipeline + create a KFP run")
    config_args(sb)
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
    config_args(rm)
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
