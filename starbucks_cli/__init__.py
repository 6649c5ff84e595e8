"""The `starbucks` console script: `starbucks <command> [args]` is `python -m <module> [args]`.

It sits outside the library (`retrieval/` knows no stage). Adding a command is one entry in
`COMMANDS`: its name -> (the module whose `main(argv)` runs it, a one-line summary), and one in
`USAGE`: its arguments as `starbucks --help` shows them (the main ones; `starbucks <command> --help`
lists them all; a test checks each against the command's own parser).
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

COMMANDS = {
    "train": ("train.__main__", "fine-tune a retriever (train.method: srl | 2dmse | separate | full | smae)"),
    "pretrain": ("train.pretrain", "SMAE pre-training (default config: configs/smae.yaml)"),
    "mine": ("train.mine", "hard negatives for a split's queries (BM25 or a model at any size) -> training groups"),
    "encode": ("encode.__main__", "corpus and queries -> per-size embedding shards"),
    "search": ("search.__main__", "one index per size -> TREC run files"),
    "eval": ("eval.__main__", "run files + qrels -> per-size metrics, tables, plots; compare experiments"),
    "suite": ("eval.suite", "many models on many collections (BEIR, python-docs) at every size; averages, t-tests"),
    "sizes": ("eval.sizes", "quality vs latency and memory per size of a run; the best size within a budget"),
    "mteb": ("eval.mteb_task", "MTEB at any size: local BEIR folders offline, MTEB's hub tasks with internet"),
    "export": ("train.export", "a sentence-transformers model or ONNX graph per size; model card; upload to the hub"),
    "experiment": ("experiment.__main__", "the paper's comparison: every method through every stage, then the report"),
}

CONFIG_ARGS = "[--config FILE] [key=value ...]"  # a config-driven command: a YAML file, then overrides
USAGE = {
    "train": CONFIG_ARGS,
    "pretrain": CONFIG_ARGS,
    "mine": "[--config FILE] [--split SPLIT] [--retriever bm25|MODEL] [--size SIZE] [--out FILE] [options] [key=value ...]",
    "encode": "[--config FILE] [--shard I/N] [key=value ...]",
    "search": CONFIG_ARGS,
    "eval": "[--config FILE] [EXPERIMENT_DIR ...] [key=value ...]",
    "suite": "--models [NAME=]PATH ... [--collections [NAME=]SOURCE ...] [--suite FILE] [--sizes SIZES] [--out DIR] [options]",
    "sizes": "RUN_DIR [--split SPLIT] [--max-latency-ms MS] [--max-bytes BYTES] [options]",
    "mteb": "MODEL ... [--sizes SIZES] [--collections [NAME=]SOURCE ...] [--tasks TASK ...] [--name ORG/NAME] [options]",
    "export": "MODEL [--size SIZE | --all] [--out DIR] [--onnx DIR] [--push-to-hub USER/NAME] [--dry-run] [options]",
    "experiment": "[--config FILE] [--only RUNS] [--dry-run] [--estimate] [--report-only] [key=value ...]",
}


def usage() -> str:
    """The `starbucks --help` text: each command's summary, then its usage."""
    width = max(map(len, COMMANDS))
    lines = ["usage: starbucks <command> [arguments]", "", "commands:"]
    for name, (_, summary) in COMMANDS.items():
        lines += [f"  {name:<{width}}  {summary}", f"  {'':<{width}}    starbucks {name} {USAGE[name]}"]
    lines += ["", "`starbucks <command> --help` describes a command; `starbucks X` is `python -m <module of X>`."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run `starbucks <command> [args]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        got = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"starbucks: {got}; use one of {', '.join(COMMANDS)} (starbucks --help)", file=sys.stderr)
        raise SystemExit(2)
    module, _ = COMMANDS[argv[0]]
    importlib.import_module(module).main(argv[1:])
