"""``docev`` command line: every pipeline step, each taking ``--config FILE`` plus ``key.sub=value``
overrides (torchtune style, anywhere on the line). Config problems exit 2 with one line per problem; a
missing prerequisite (``docev.preflight``) exits 3 with one line naming the command that makes it; a
storage fault that outlasted its retries exits 75 (EX_TEMPFAIL: rerunning may succeed) naming the path."""

from __future__ import annotations

import argparse
import sys

from docev.cli import data, model, pipeline
from docev.config import ConfigError

TRANSIENT_EXIT = 75  # sysexits' EX_TEMPFAIL: a transient fault outlasted the retries; a rerun may succeed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docev", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (data, model, pipeline):
        group.add_commands(sub)
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
