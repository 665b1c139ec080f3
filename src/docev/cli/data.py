"""``docev`` commands that read a config or make and check data: ``config``, ``init-checkpoint``,
``synth-data``, ``validate``, ``preprocess``, ``tokens``. None imports torch at start (tests/test_cold_start.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docev.cli.args import config_args
from docev.config import ConfigError, json_schema, load_config


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


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The config and data-step subcommands, in the order ``docev --help`` lists them."""
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
    config_args(val)
    val.add_argument("--workers", type=int, default=None, help="processes (default: validate.workers)")
    val.add_argument("--shard", default="0/1", help="validate only shard i of n (KFP fan-out)")
    val.add_argument("--merge", type=int, default=0, metavar="N", help="merge the outputs of N shards")
    val.set_defaults(func=cmd_validate)

    pre = sub.add_parser("preprocess", help="validated records -> tiled, tokenized Arrow shards + manifest.json")
    config_args(pre)
    pre.add_argument("--workers", type=int, default=None, help="processes (default: preprocess.workers)")
    pre.add_argument("--shard", default="0/1", help="build only shards k with k %% n == i (KFP fan-out)")
    pre.add_argument("--merge", action="store_true", help="check every shard and write manifest.json")
    pre.set_defaults(func=cmd_preprocess)

    tk = sub.add_parser("tokens", help="what a page costs: canvas, tiles and image tokens per sampling ratio")
    config_args(tk)
    tk.add_argument("--size", type=_size, action="append", required=True, metavar="HxW", help="image size (repeat)")
    tk.set_defaults(func=cmd_tokens)
