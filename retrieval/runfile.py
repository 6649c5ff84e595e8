"""TREC run files: `qid Q0 docid rank score tag`, one line per retrieved passage, best first.

Scores are written with 9 significant digits, enough to tell any two float32 values apart, so
evaluation tools that re-sort by score (trec_eval, ir_measures) see the ranking that was written.
Search writes `<runs>/<split>/<size>.trec` and beside it `<size>.json`, a record of what produced
it (size, embeddings, index, depth) that tells a later search whether the run is up to date and
tells eval the size's layers and dims.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from retrieval.errors import StarbucksError
from retrieval.io import atomic_path, open_text
from retrieval.sizes import Size, parse_size

RUN_SUFFIX = ".trec"

Run = dict[str, dict[str, float]]


def format_run_lines(qid: str, ranked: Iterable[tuple[str, float]], tag: str) -> Iterable[str]:
    """The lines of one query's ranking (rank 1 first)."""
    for rank, (docid, score) in enumerate(ranked, 1):
        yield f"{qid} Q0 {docid} {rank} {float(score):.9g} {tag}\n"


def write_run(path: str | os.PathLike, rankings: Iterable[tuple[str, Sequence[tuple[str, float]]]], tag: str) -> int:
    """Write `(qid, [(docid, score), ...])` rankings atomically; returns the number of lines."""
    if not tag or any(c.isspace() for c in tag):
        raise StarbucksError(f"run tag {tag!r} must be a non-empty word without spaces")
    lines = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for qid, ranked in rankings:
                for line in format_run_lines(qid, ranked, tag):
                    f.write(line)
                    lines += 1
    return lines


def read_run(path: str | os.PathLike) -> Run:
    """`{qid: {docid: score}}` from a TREC run file (`.gz` read transparently)."""
    path = Path(path)
    run: Run = {}
    with open_text(path, "run file") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise StarbucksError(
                    f"{path} line {lineno}: expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}"
                )
            qid, _, docid, _, score, _ = parts
            try:
                run.setdefault(qid, {})[docid] = float(score)
            except ValueError:
                raise StarbucksError(f"{path} line {lineno}: score {score!r} is not a number") from None
    return run


def run_path(runs_dir: str | os.PathLike, split: str, size_name: str) -> Path:
    return Path(runs_dir) / split / f"{size_name}{RUN_SUFFIX}"


def run_stem(path: str | os.PathLike) -> str:
    """The size part of a run file's name: `grande` of `grande.trec` or `grande.trec.gz`."""
    name = Path(path).name
    for suffix in (RUN_SUFFIX + ".gz", RUN_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_run_record(path: str | os.PathLike) -> dict | None:
    """The record beside a run file (None if there is none or it is unreadable)."""
    p = Path(path).parent / f"{run_stem(path)}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_runs(runs_dir: str | os.PathLike, split: str) -> list[tuple[Size, Path]]:
    """The run files of a split (`<size>.trec`, or gzipped `<size>.trec.gz`) with their sizes (from the
    records; `LxD` names parse without one), smallest size first."""
    found = []
    folder = Path(runs_dir) / split
    for path in sorted([*folder.glob(f"*{RUN_SUFFIX}"), *folder.glob(f"*{RUN_SUFFIX}.gz")]):
        record = read_run_record(path)
        if record and {"size", "layers", "dim"} <= record.keys():
            size = Size(record["size"], int(record["layers"]), int(record["dim"]))
        else:
            try:
                size = parse_size(run_stem(path))
            except StarbucksError:
                continue  # a run file of unknown size: not ours
        found.append((size, path))
    return sorted(found, key=lambda t: (t[0].layers, t[0].dim, t[0].name))
