"""Arguments every config-reading ``docev`` subcommand shares."""

from __future__ import annotations

import argparse


def config_args(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``key.sub=value`` overrides (taken anywhere on the line, see ``docev.cli._parse``)."""
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
