"""Build the shipped `python-docs` collection from the standard library of this interpreter.

Query = the one-line summary of a public function's, method's or class's docstring, relevant
passage = the rest of that docstring; the corpus also holds the docstring bodies of documented
objects whose summary cannot be a query (too short, or shared with another object) as
distractors. Source files are parsed statically with `ast` (no stdlib module is imported).
A `test` split only: the collection is for out-of-domain evaluation, never for training.

    python -m corpora.python_docs --out data/python-docs

Rebuilding from the same source tree gives byte-identical data files (the README alone carries
the build date). The rules are in `RULES_DOC` (and the README).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import platform
import shlex
import shutil
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from corpora.common import (
    BM25_DEPTH,
    Collection,
    bm25_reference,
    bm25_table,
    check_date,
    collapse_near_duplicates,
    collection_stats,
    count_table,
    drop_repeated,
    normalize,
    write_stats,
)
from retrieval.errors import StarbucksError, cli_entry

DEFAULT_OUT = "data/python-docs"
SKIPPED_PACKAGES = ("test", "tests", "idle_test")  # test suites, not the library's API
THIRD_PARTY = ("site-packages", "dist-packages")  # not walked
MIN_PASSAGE_WORDS = 15
MIN_SUMMARY_WORDS = 3
DROP_RULES = ("short_passage", "duplicate_passage")  # the object is dropped
NO_QUERY_RULES = ("short_summary", "duplicate_summary")  # its passage stays, as a distractor
LICENSE_FILE = "LICENSE.txt"  # CPython's, copied from the source next to the data
LICENSE_NOTE = (
    "The docstrings are part of CPython's standard library, copyright the Python Software Foundation "
    "(2001 and later; All Rights Reserved), and are used under the PSF License Agreement (Python "
    "Software Foundation License Version 2), which allows derivative works that retain the agreement and "
    f"the copyright notice: both are in `{LICENSE_FILE}`, copied unchanged from the source. The text is "
    "included here, unchanged apart from docstring dedenting (`inspect.cleandoc`) and whitespace "
    "normalisation, for research on retrieval."
)


@dataclass(frozen=True)
class Documented:
    """A public function, method or class with a docstring, split into its summary and body."""

    name: str  # qualified: module.Class.method
    summary: str  # the first paragraph of the docstring, on one line
    passage: str  # the other paragraphs, each on one line, joined with newlines


def default_source() -> Path:
    """This interpreter's standard library directory."""
    return Path(sysconfig.get_path("stdlib"))


def module_name(relative: Path) -> str | None:
    """`json/decoder.py` -> `json.decoder`, `json/__init__.py` -> `json`; None for a module that is
    private (a part starting with `_`), not importable by name (`config-3.11-x86_64`) or in a test suite."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(not p.isidentifier() or p.startswith("_") for p in parts):
        return None
    if any(p in SKIPPED_PACKAGES for p in parts):
        return None
    return ".".join(parts)


def split_docstring(doc: str) -> tuple[str, str]:
    """`(summary, passage)`: the first paragraph on one line, the others each on one line, newline-joined."""
    paragraphs, current = [], []
    for line in doc.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    if not paragraphs:
        return "", ""
    return normalize(paragraphs[0]), "\n".join(normalize(p) for p in paragraphs[1:])


def _public(node: ast.stmt) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_")


def documented_objects(tree: ast.Module, module: str) -> Iterator[Documented]:
    """The module's public top-level functions and classes and the public methods of those classes,
    in source order; a name defined twice in one scope keeps its last definition (the one Python binds)."""

    def scope(body: Sequence[ast.stmt], prefix: str, depth: int) -> Iterator[Documented]:
        last = {node.name: node for node in body if _public(node)}
        for node in body:
            if not _public(node) or last[node.name] is not node:
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield Documented(name, *split_docstring(doc))
            if isinstance(node, ast.ClassDef) and depth == 0:
                yield from scope(node.body, name, depth + 1)

    yield from scope(tree.body, module, 0)


def _python_files(source: Path) -> Iterator[Path]:
    """The `*.py` files under `source`, outside third-party directories (`site-packages`, `dist-packages`)."""
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if d not in THIRD_PARTY]
        yield from (Path(root, f) for f in files if f.endswith(".py"))


def read_objects(source: Path) -> tuple[list[Documented], dict[str, int]]:
    """Every documented public object under `source`, sorted by name, and file counts."""
    files = sorted(p.relative_to(source) for p in _python_files(source))
    counts = Counter()
    objects = []
    for relative in files:
        module = module_name(relative)
        if module is None:
            counts["files_skipped"] += 1
            continue
        try:
            tree = ast.parse((source / relative).read_bytes(), filename=str(relative))
        except (SyntaxError, ValueError):  # e.g. lib2to3's Python 2 samples
            counts["files_unparsable"] += 1
            continue
        counts["files_parsed"] += 1
        objects.extend(documented_objects(tree, module))
    names = Counter(o.name for o in objects)
    if max(names.values(), default=1) > 1:  # `a/b.py` and `a/b/__init__.py`: refuse rather than guess
        twice = sorted(n for n, c in names.items() if c > 1)
        raise StarbucksError(f"{source}: {len(twice)} objects are defined by two files (first: {twice[0]})")
    return sorted(objects, key=lambda o: o.name), dict(counts)


def apply_rules(objects: Sequence[Documented]) -> tuple[Collection, dict[str, int]]:
    """The collection (a `test` split only) and how many objects each rule dropped, in `RULES_DOC`'s order."""
    dropped = {}
    kept = [o for o in objects if len(o.passage.split()) >= MIN_PASSAGE_WORDS]
    dropped["short_passage"] = len(objects) - len(kept)
    kept, dropped["duplicate_passage"] = collapse_near_duplicates(
        kept, family=lambda o: o.passage.lower(), rank=lambda o: (len(o.name), o.name)
    )
    kept.sort(key=lambda o: o.name)
    queries = [o for o in kept if len(o.summary.split()) >= MIN_SUMMARY_WORDS]
    dropped["short_summary"] = len(kept) - len(queries)
    queries, dropped["duplicate_summary"] = drop_repeated(queries, key=lambda o: o.summary.lower())
    collection = Collection(
        corpus={o.name: o.passage for o in kept},
        queries={o.name: o.summary for o in queries},
        splits={"test": [o.name for o in queries]},
        positive={o.name: o.name for o in queries},
        groups=[],
        info={"distractors": len(kept) - len(queries)},
    )
    return collection, dropped


def objects_digest(objects: Sequence[Documented]) -> str:
    """sha256 over the collection's raw material (every kept object's name, summary and passage)."""
    h = hashlib.sha256()
    for o in objects:
        h.update(f"{o.name}\0{o.summary}\0{o.passage}\n".encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------

FILES_DOC = """\
| file | content |
|---|---|
| `corpus.jsonl.gz` | `{"_id": qualified name, "text": docstring body}` (no title), sorted by `_id` |
| `queries.jsonl.gz` | `{"_id": qualified name, "text": docstring summary}`, sorted by `_id` |
| `qrels/test.tsv` | `query-id  corpus-id  score` (header; score 1; query id = doc id) |
| `stats.json` | the counts and BM25 scores below, machine-readable |
| `LICENSE.txt` | CPython's license (the PSF License Agreement), copied from the source |
"""

RULES_DOC = f"""\
Files: every `*.py` under the standard library directory outside `site-packages` and
`dist-packages`, in sorted path order, parsed with `ast` (nothing is imported). A file is skipped
when a part of its module path starts with `_` (private), is not an identifier (`config-3.x-...`)
or is one of {", ".join(f"`{p}`" for p in SKIPPED_PACKAGES)}
(test suites); files that do not parse (Python 2 samples) are skipped too.

Objects: the public (no leading `_`) functions and classes at a module's top level and the public
methods of those classes, with a docstring (`ast.get_docstring`, cleaned as `inspect.cleandoc`
does); a name defined twice in one scope keeps its last definition. Id = the qualified name
(`json.JSONDecoder.decode`). The docstring's first paragraph, whitespace-joined onto one line, is
the summary; the other paragraphs, each whitespace-joined onto one line and separated by
newlines, are the passage. Rules, in order (an object is counted under the first rule it fails):

1. `short_passage`: passages under {MIN_PASSAGE_WORDS} words (whitespace-separated) are dropped;
2. `duplicate_passage`: objects with the same passage (case-insensitive) keep one, the one with the
   shortest qualified name (ties: lexicographically smallest);
3. `short_summary`: a summary under {MIN_SUMMARY_WORDS} words is no query; its passage stays as a distractor;
4. `duplicate_summary`: summaries occurring more than once after step 3 (case-insensitive) are no
   queries, all of them; their passages stay as distractors.

Every query has exactly one relevant passage (its own object's); the corpus holds every kept
passage. One split, `test`: the collection is for out-of-domain evaluation; never train on it.
"""


def write_readme(out: Path, stats: dict, date: str, command: str) -> None:
    """Write the dataset README (the only file carrying the build date)."""
    rows = [
        ("source files parsed", stats["files_parsed"]),
        ("source files skipped", stats["files_skipped"]),
        ("source files unparsable", stats["files_unparsable"]),
        ("documented objects", stats["documented"]),
        ("passages", stats["passages"]),
        ("queries (test)", stats["queries"]["test"]),
        ("distractor passages (no query)", stats["distractors"]),
        *((f"dropped: {rule}", n) for rule, n in stats["dropped"].items()),
    ]
    text = f"""# python-docs

Docstrings of the Python {stats["python_version"]} standard library as a retrieval collection: query = the
one-line summary of a public function's, method's or class's docstring, relevant passage = the rest
of that docstring. Built by `corpora/python_docs.py` from the interpreter that ran it.

- Source: the standard library of CPython {stats["python_version"]} (`{stats["source"]}`), parsed statically;
  sha256 of the extracted objects `{stats["objects_sha256"]}`
- Build date: {date}
- Command: `{command}`

## Files

{FILES_DOC}
## Counts

{count_table(rows)}

## Recipe

{RULES_DOC}
## BM25 reference

bm25s (English stopwords, stemmer: {stats["bm25"]["stemmer"]}), the queries searched over the whole corpus
(top {stats["bm25"]["depth"]}), scored with `ir_measures` (`RR@10` is MRR@10).
`corpora.common.bm25_reference(dir, splits=["test"])` recomputes these.

{bm25_table(stats["bm25"]["scores"])}

## License

{LICENSE_NOTE}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    import datetime

    p = argparse.ArgumentParser(
        prog="python -m corpora.python_docs",
        description="Build the python-docs collection from this interpreter's standard library.",
    )
    p.add_argument("--source", default=str(default_source()), help="standard library directory (default: this one)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--stemmer", default="none", help="PyStemmer language for BM25 (default: none)")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="build date for the README (YYYY-MM-DD)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    check_date(args.date)
    return args


def build(args: argparse.Namespace) -> dict:
    """Run the whole build; return the stats."""
    started = time.time()
    source = Path(args.source)
    if not source.is_dir():
        raise StarbucksError(f"--source {source} is not a directory; give a Python standard library directory")
    objects, files = read_objects(source)
    collection, dropped = apply_rules(objects)
    if not collection.queries:
        raise StarbucksError(f"{source} gave no queries ({len(objects)} documented objects); is it a Python library?")
    out = Path(args.out)
    collection.write(out)
    if (source / LICENSE_FILE).is_file():
        shutil.copyfile(source / LICENSE_FILE, out / LICENSE_FILE)
    stats = {
        "source": source.name if source == default_source() else str(source),
        "python_version": platform.python_version() if source == default_source() else "unknown",
        "objects_sha256": objects_digest(objects),
        "files_parsed": files.get("files_parsed", 0),
        "files_skipped": files.get("files_skipped", 0),
        "files_unparsable": files.get("files_unparsable", 0),
        "documented": len(objects),
        "dropped": dropped,
        **collection_stats(collection),
        "bm25": {
            "stemmer": args.stemmer,
            "depth": BM25_DEPTH,
            "scores": bm25_reference(out, splits=["test"], stemmer=args.stemmer, progress=not args.no_progress),
        },
    }
    for key in ("train_groups", "negatives_per_group"):  # no training data
        stats.pop(key)
    write_stats(out, stats)
    where = [] if source == default_source() else ["--source", str(source)]
    command = shlex.join(["python", "-m", "corpora.python_docs", *where, "--out", args.out, "--stemmer", args.stemmer])
    write_readme(out, stats, args.date, command)
    if not args.no_progress:
        print(
            f"python-docs: {len(collection.queries)} queries, {len(collection.corpus)} passages from "
            f"{stats['files_parsed']} files in {out} ({time.time() - started:.0f}s)",
            file=sys.stderr,
        )
    return stats


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m corpora.python_docs`."""
    build(_parse_args(argv))


if __name__ == "__main__":
    main()
