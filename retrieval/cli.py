"""Command-line plumbing shared by the stages, and the `starbucks <stage>` console script."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from retrieval.config import DEFAULT_CONFIG, load_config

STAGES = ("train", "encode", "search", "eval", "experiment")


def stage_parser(stage: str, description: str, default_config: str = DEFAULT_CONFIG) -> argparse.ArgumentParser:
    """An argument parser with `--config` and trailing `key=value` overrides."""
    parser = argparse.ArgumentParser(prog=f"python -m {stage}", description=description)
    parser.add_argument("--config", default=default_config, help=f"experiment YAML (default: {default_config})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return parser


def parse_stage_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None):
    """Parse argv; returns `(cfg, args)` with the config loaded and overrides applied."""
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args



def main(argv: Sequence[str] | None = None) -> None:
    """`starbucks <stage> [args]`: the same as `python -m <stage> [args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STAGES:
        print(f"usage: starbucks {{{','.join(STAGES)}}} [--config FILE] [key=value ...]", file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"{argv[0]}.__main__")
    module.main(argv[1:])


__all__ = ["main", "parse_stage_args", "stage_parser"]
