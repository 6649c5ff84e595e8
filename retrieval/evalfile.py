"""The files eval writes per split, and their reader (what the experiment report reads).

- `<eval>/<split>.json`: per size its means (`sizes[i].metrics`), the run file it evaluated
  (`sizes[i].run`), and for the split `queries`, `rel_level`, `measures`;
- `<eval>/<split>.perquery.json.gz` (`format_version` 1): per size (`size`, `layers`, `dim`) the
  value of every measure for every judged query (`per_query[measure][qid]`; a query the run does
  not rank counts 0). The means of the first are the means of these values.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_gzip
from retrieval.metrics import Evaluation
from retrieval.sizes import Size, recorded_size

PER_QUERY_VERSION = 1


def split_json(eval_dir: str | os.PathLike, split: str) -> Path:
    return Path(eval_dir) / f"{split}.json"


def per_query_path(eval_dir: str | os.PathLike, split: str) -> Path:
    return Path(eval_dir) / f"{split}.perquery.json.gz"


def write_per_query(eval_dir: str | os.PathLike, split: str, results: Sequence[tuple[Size, Evaluation]]) -> Path:
    """Write the split's per-query values (same bytes for the same values)."""
    path = per_query_path(eval_dir, split)
    record = {
        "format_version": PER_QUERY_VERSION,
        "split": split,
        "sizes": [
            {"size": size.name, "layers": size.layers, "dim": size.dim, "per_query": ev.per_query}
            for size, ev in results
        ],
    }
    atomic_write_gzip(path, [json.dumps(record, sort_keys=True)])
    return path


@dataclass
class SizeScores:
    """One size's evaluation as eval wrote it."""

    size: Size
    run: Path  # the run file eval read
    evaluation: Evaluation  # measures: display name -> ir_measures name, as text


def read_summary(eval_dir: str | os.PathLike, split: str) -> dict | None:
    """`<eval>/<split>.json`, or None when eval has not written it."""
    path = split_json(eval_dir, split)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StarbucksError(
            f"cannot read {path} ({err}); re-run `python -m eval` for {Path(eval_dir).parent}"
        ) from None


def read_split(eval_dir: str | os.PathLike, split: str) -> list[SizeScores] | None:
    """The split's per-size scores from eval's two files; None when eval has not written the split.
    A per-query file that is missing, of another version, or disagrees with the means is refused."""
    summary = read_summary(eval_dir, split)
    if summary is None:
        return None
    summary_path, values_path = split_json(eval_dir, split), per_query_path(eval_dir, split)
    redo = f"re-run `python -m eval` for {Path(eval_dir).parent}"
    if not values_path.is_file():
        raise StarbucksError(f"{values_path} is missing (written by an older eval?); {redo}")
    try:
        values = json.loads(gzip.decompress(values_path.read_bytes()))
    except (OSError, ValueError, EOFError) as err:
        raise StarbucksError(f"cannot read {values_path} ({err}); {redo}") from None
    if values.get("format_version") != PER_QUERY_VERSION:
        raise StarbucksError(
            f"{values_path} has format version {values.get('format_version')!r}, "
            f"this code reads {PER_QUERY_VERSION}; {redo}"
        )
    per_size = {(v["size"], v["layers"], v["dim"]): v["per_query"] for v in values["sizes"]}
    out = []
    for entry in summary["sizes"]:
        size = recorded_size(entry["size"], entry["layers"], entry["dim"])
        per_query = per_size.get((entry["size"], size.layers, size.dim))
        means = entry["metrics"]
        if (
            per_query is None
            or set(per_query) != set(means)
            or not all(
                math.isclose(
                    sum(per_query[m].values()) / max(len(per_query[m]), 1), means[m], rel_tol=1e-9, abs_tol=1e-12
                )
                for m in means
            )
        ):
            raise StarbucksError(
                f"{values_path} does not hold the per-query values of size {size.key} behind {summary_path}; {redo}"
            )
        out.append(SizeScores(size, Path(entry["run"]), Evaluation(dict(summary["measures"]), per_query, means)))
    return out
