"""`python -m eval [--config FILE] [EXPERIMENT_DIR ...] [key=value ...]`"""

from eval.pipeline import compare_experiments, evaluate_experiment
from retrieval.cli import stage_parser
from retrieval.config import load_config
from retrieval.errors import cli_entry


@cli_entry
def main(argv=None):
    parser = stage_parser(
        "eval",
        "Evaluate the run files of every size and split (ir_measures) and write tables and plots. "
        "With experiment directories (runs/a runs/b ...), compare them side by side with a paired "
        "t-test per size against eval.baseline (default: the first).",
    )
    parser.usage = "python -m eval [--config CONFIG] [EXPERIMENT_DIR ...] [key=value ...]"
    args = parser.parse_args(argv)
    overrides = [a for a in args.overrides if "=" in a]
    experiments = [a for a in args.overrides if "=" not in a]
    cfg = load_config(args.config, overrides)
    if experiments:
        compare_experiments(cfg, experiments)
    else:
        evaluate_experiment(cfg)


if __name__ == "__main__":
    main()
