"""TREC run files: `qid Q0 docid rank score tag`, one line per retrieved passage, best first.

Scores are written with 9 significant digits, enough to tell any two float32 values apart, so
evaluation tools that re-sort by score (trec_eval, ir_measures) see the ranking that was written.
Search writes `<runs>/<split>/<size>.trec` and beside it `<size>.json`, a record of what produced
it (size, embeddings, index, depth) that tells a later search whether the run is up to date and
tells eval the size's layers and dims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from retrieval.errors import StarbucksError
from retrieval.io import atomic_path, atomic_write_json, iter_lines
from retrieval.sizes import Size, parse_size, recorded_size

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
    """`{qid: {docid: score}}` from a TREC run file (`.gz` read transparently); a passage ranked twice for
    one query is refused."""
    path = Path(path)
    run: Run = {}
    for lineno, line in iter_lines(path, "run file"):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise StarbucksError(
                f"{path} line {lineno}: expected 6 fields 'qid Q0 docid rank score tag', got {len(parts)}"
            )
        qid, _, docid, _, score, _ = parts
        ranked = run.setdefault(qid, {})
        if docid in ranked:
            raise StarbucksError(
                f"{path} line {lineno}: query {qid!r} ranks passage {docid!r} a second time; a run "
                f"lists each passage once per query: remove the duplicate or re-run the search"
            )
        try:
            ranked[docid] = float(score)
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


def record_path(path: str | os.PathLike) -> Path:
    """Where the record of a run file lives: `<size>.json` beside `<size>.trec[.gz]`."""
    return Path(path).parent / f"{run_stem(path)}.json"


def read_run_record(path: str | os.PathLike) -> dict | None:
    """The record beside a run file (None if there is none or it is unreadable)."""
    try:
        return json.loads(record_path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sha256(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def run_file_summary(path: str | os.PathLike) -> dict:
    """What identifies a run file's content: sha256 of its bytes, its lines and its queries."""
    lines, queries = 0, set()
    for _, line in iter_lines(path, "run file"):
        if line.strip():
            lines += 1
            queries.add(line.split(None, 1)[0])
    return {"sha256": _sha256(path), "lines": lines, "queries": len(queries)}


def write_run_record(path: str | os.PathLike, record: dict) -> dict:
    """Write the record of the run file at `path` (after the file): `record` plus the file's summary,
    so that a later search or eval can tell the file is still the one written."""
    full = {**record, "file": run_file_summary(path)}
    atomic_write_json(record_path(path), full)
    return full


def check_run_file(path: str | os.PathLike, record: dict | None = None) -> str | None:
    """None if the run file matches the summary in its record (or has no record to check against),
    else what differs, in words."""
    record = read_run_record(path) if record is None else record
    saved = (record or {}).get("file")
    if not saved or _sha256(path) == saved.get("sha256"):
        return None
    now = run_file_summary(path)  # only to say what differs
    if now["queries"] != saved["queries"] or now["lines"] != saved["lines"]:
        return (
            f"it holds {now['queries']} queries / {now['lines']} lines, but {saved['queries']} / {saved['lines']} "
            f"were written"
        )
    return "its checksum differs from the one written"


def verified_run(path: str | os.PathLike) -> dict | None:
    """The record of a run file, after checking the file is the one written (one line if not)."""
    record = read_run_record(path)
    problem = check_run_file(path, record)
    if problem:
        raise StarbucksError(
            f"run file {path} is not the file search wrote: {problem}; it was cut or edited: "
            f"delete it and re-run `python -m search`"
        )
    return record


def find_runs(runs_dir: str | os.PathLike, split: str) -> list[tuple[Size, Path]]:
    """The run files of a split (`<size>.trec`, or gzipped `<size>.trec.gz`) with their sizes (from the
    records; `LxD` names parse without one), smallest size first; a quantised search of a size
    (`<size>.<precision>.trec`) is a size of its own named so."""
    found = []
    folder = Path(runs_dir) / split
    for path in sorted([*folder.glob(f"*{RUN_SUFFIX}"), *folder.glob(f"*{RUN_SUFFIX}.gz")]):
        record = read_run_record(path)
        if record and {"size", "layers", "dim"} <= record.keys():
            size = recorded_size(record["size"], int(record["layers"]), int(record["dim"]))
            if record.get("quantization"):  # an int8 / binary search of the size: its own row, `<size>.<precision>`
                size = dataclasses.replace(
                    size, name=f"{size.name}.{record['quantization']}", precision=record["quantization"]
                )
        else:
            try:
                size = parse_size(run_stem(path))
            except StarbucksError:
                continue  # a run file of unknown size: not ours
        found.append((size, path))
    return sorted(found, key=lambda t: (*t[0].ident, t[0].name))
