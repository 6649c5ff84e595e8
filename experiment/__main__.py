"""`python -m experiment --config FILE [--only RUNS] [--dry-run] [key=value ...]`"""

from __future__ import annotations

from experiment.pipeline import describe, run_experiment
from retrieval.cli import parse_stage_args, stage_parser
from retrieval.errors import cli_entry


@cli_entry
def main(argv=None) -> None:
    parser = stage_parser(
        "experiment",
        "Train, encode, search and evaluate every method of the paper's comparison under one config, then "
        "write the report (results.md, plots, run files). Re-run the same command to finish what is missing.",
        default_config="configs/experiment-debian.yaml",
    )
    parser.add_argument("--only", metavar="RUNS", help="comma list of runs to (re)do, e.g. srl,2dmse; no report")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their overrides, run nothing")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="with --dry-run: each training run's steps, model FLOPs and time on an H100 (from the data)",
    )
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    cfg, args = parse_stage_args(parser, argv)
    if args.dry_run:
        print(describe(cfg, args.config, list(args.overrides), args.estimate))
        return
    run_experiment(args.config, list(args.overrides), args.only, report_only=args.report_only)


if __name__ == "__main__":
    main()
