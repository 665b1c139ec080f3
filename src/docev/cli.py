"""``docev`` command line: every pipeline step, each taking ``--config FILE`` plus ``key.sub=value``
overrides (torchtune style). Config problems exit 2 with one line per problem."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from docev.config import ConfigError, json_schema, load_config


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
    from docev.run import run_local

    run_local(load_config(args.config, args.overrides))
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

    tk = sub.add_parser("tokens", help="what a page costs: canvas, tiles and image tokens per sampling ratio")
    _config_args(tk)
    tk.add_argument("--size", type=_size, action="append", required=True, metavar="HxW", help="image size (repeat)")
    tk.set_defaults(func=cmd_tokens)

    run = sub.add_parser("run", help="run the whole pipeline locally")
    _config_args(run)
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print("config error:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
