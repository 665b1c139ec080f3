"""Compile the pipeline for one config into KFP IR YAML.

    python pipelines/compile.py [--config configs/docev_preview.yaml] [--out pipelines/docev_finetune.yaml]
                                [--check] [key.sub=value ...]

The config is loaded and validated with the same schema and errors as every other entry point
(exit 2 on a config error). ``--check`` compiles to memory and exits 1 when ``--out`` differs (CI uses
it: the committed YAML must be what this script produces).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "docev_preview.yaml"
DEFAULT_OUT = ROOT / "pipelines" / "docev_finetune.yaml"


def compile_pipeline(config: str | Path, out: str | Path, overrides: list[str] | None = None) -> Path:
    from kfp import compiler

    from docev.config import load_config
    from pipelines.pipeline import build_pipeline

    cfg = load_config(config, overrides)
    compiler.Compiler().compile(build_pipeline(cfg), str(out))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from docev.config import ConfigError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--check", action="store_true", help="fail if --out is not what compiling gives")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    try:
        if args.check:
            with tempfile.TemporaryDirectory() as tmp:
                fresh = compile_pipeline(args.config, Path(tmp) / "pipeline.yaml", args.overrides).read_text()
            if not Path(args.out).is_file() or Path(args.out).read_text() != fresh:
                print(f"{args.out} is stale: run `python pipelines/compile.py` and commit it", file=sys.stderr)
                return 1
            print(f"{args.out} is up to date")
            return 0
        out = compile_pipeline(args.config, args.out, args.overrides)
    except ConfigError as exc:
        print("config error:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    print(f"compiled {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
