"""`python -m eval`: run files + qrels -> per-size metrics, tables, plots, significance tests."""

from retrieval.metrics import DEFAULT_MEASURES, Evaluation, evaluate, paired_ttest, parse_measures
from eval.pipeline import compare_experiments, evaluate_experiment

__all__ = [
    "DEFAULT_MEASURES",
    "Evaluation",
    "compare_experiments",
    "evaluate",
    "evaluate_experiment",
    "paired_ttest",
    "parse_measures",
]
