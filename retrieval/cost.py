"""What a training run cost: `<output_dir>/train_summary.json`, written by the trainer when a run ends.

Keys: `steps`, `seconds` (wall time of the training loop, summed over resumed invocations),
`flops` (model FLOPs, forward + backward, of the matrix products on the real tokens, summed over
ranks), `device`, `processes`, and the task's own entries (`task`, `examples`, ...).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retrieval.errors import StarbucksError

TRAIN_SUMMARY = "train_summary.json"
REQUIRED = ("steps", "seconds", "flops", "device")


def read_train_summary(run_dir: str | os.PathLike) -> dict | None:
    """A run's cost record, or None when it has not finished training (or has no record)."""
    path = Path(run_dir) / TRAIN_SUMMARY
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StarbucksError(f"{path} is not valid JSON ({err.msg}); delete it and re-run the training to remake it")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise StarbucksError(f"{path} lacks {', '.join(missing)}; delete it and re-run the training to remake it")
    return record


def total_cost(directories) -> dict | None:
    """The cost of everything trained under `directories`: each one's own `train_summary.json` plus those of
    the runs beneath it (its head warm-up's, ...), summed; None when one of them has no summary of its own
    (not finished: a finished head warm-up under an unfinished pre-training is not its cost)."""
    found = []
    for directory in directories:
        if not (Path(directory) / TRAIN_SUMMARY).is_file():
            return None
        paths = sorted(Path(directory).glob(f"**/{TRAIN_SUMMARY}"))
        found += [read_train_summary(p.parent) for p in paths]
    return {
        "runs": len(found),
        "steps": sum(r["steps"] for r in found),
        "seconds": sum(r["seconds"] for r in found),
        "flops": sum(r["flops"] for r in found),
        "device": ", ".join(sorted({r["device"] for r in found})),
    }
