"""Command-line plumbing shared by the stages (the `starbucks` console script is `starbucks_cli`)."""

from __future__ import annotations

import argparse
from typing import Sequence

from retrieval.config import DEFAULT_CONFIG, load_config


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


__all__ = ["parse_stage_args", "stage_parser"]
