"""Build the embedded `debian-pkgs` retrieval collection from Debian's Translation-en file.

Query = a package's one-line synopsis, relevant passage = its long description. The full
collection (`data/debian-pkgs`) and a small, still hard subset (`data/debian-pkgs-mini`) are
written in the BEIR layout (see DESIGN.md section 3) with BM25-mined training groups:

    python -m corpora.debian_pkgs --source <Translation-en[.lz4]> \
        --out data/debian-pkgs --mini-out data/debian-pkgs-mini

Rules, applied in this order (each dropped package is counted under the first rule it fails):
  1. a package name seen again later in the file keeps its first stanza;
  2. passages under 15 words are dropped;
  3. synopses under 3 words are dropped;
  4. near-duplicate families (same first paragraph) keep the member with the shortest name
     (ties: lexicographically smallest);
  5. synopses that occur more than once (case-insensitive, whitespace-normalised) are dropped,
     all occurrences, so every query has exactly one relevant passage.
Splits: kept packages sorted by sha1(name): the first `dev_size` are dev, the next `test_size`
test, the rest train. Rebuilding from the same source gives byte-identical data files.
"""

from __future__ import annotations

import argparse
import gzip
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tqdm import tqdm

from corpora import common
from corpora.common import (
    BM25,
    BM25_DEPTH,
    Collection,
    add_common_arguments,
    assign_splits,
    bm25_reference,
    bm25_table,
    check_date,
    collapse_near_duplicates,
    collection_stats,
    count_table,
    drop_repeated,
    mine_negatives,
    normalize,
    sha256_file,
    split_key,
    write_stats,
)
from retrieval.errors import StarbucksError, cli_entry

DEFAULT_SOURCE = "/var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_i18n_Translation-en.lz4"
DEFAULT_OUT = "data/debian-pkgs"
DEFAULT_MINI_OUT = "data/debian-pkgs-mini"
APT_HELPER = "/usr/lib/apt/apt-helper"
HOW_TO_GET = "create it with `apt-get update -o Acquire::Languages=en` (Debian bookworm, main) or pass --source FILE"

MIN_PASSAGE_WORDS = 15
MIN_SYNOPSIS_WORDS = 3
EVAL_SPLITS = ("dev", "test")
DROP_RULES = (
    "duplicate_name",
    "short_passage",
    "short_synopsis",
    "family_collapse",
    "duplicate_synopsis",
)
LICENSE_NOTE = (
    "Debian package descriptions are written by package maintainers and upstream authors and "
    "are distributed under the licences of the respective packages / the Debian archive. They "
    "are included here, unchanged apart from the whitespace normalisation described above, "
    "for research on retrieval."
)


# --------------------------------------------------------------------------------------------
# Parsing and rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One Translation-en stanza: name, synopsis and long-description paragraphs."""

    name: str
    synopsis: str
    paragraphs: tuple[str, ...]

    @property
    def passage(self) -> str:
        """The long description: paragraphs separated by newlines."""
        return "\n".join(self.paragraphs)


def read_source(path: str | Path) -> str:
    """Return the text of a Translation file (`.lz4` through apt-helper, `.gz`/`.xz`, or plain)."""
    path = Path(path)
    if not path.is_file():
        raise StarbucksError(f"source file {path} not found; {HOW_TO_GET}")
    if path.suffix == ".lz4":
        if Path(APT_HELPER).exists():
            proc = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True)
            if proc.returncode != 0:
                msg = proc.stderr.decode(errors="replace").strip().splitlines()
                raise StarbucksError(f"{APT_HELPER} cat-file {path} failed: {msg[-1] if msg else proc.returncode}")
            data = proc.stdout
        else:
            try:
                import lz4.frame
            except ImportError:
                raise StarbucksError(f"cannot decompress {path}: need {APT_HELPER} or the `lz4` package") from None
            data = lz4.frame.decompress(path.read_bytes())
    elif path.suffix == ".gz":
        data = gzip.decompress(path.read_bytes())
    elif path.suffix == ".xz":
        import lzma

        data = lzma.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise StarbucksError(f"{path} is not UTF-8 text (byte {err.start}); is it a Translation-en file?") from None


def parse_description(lines: Sequence[str]) -> tuple[str, ...]:
    """Turn Description continuation lines into paragraphs.

    Lines of a paragraph are stripped and joined with single spaces; a line that is exactly
    `.` (after the leading space) separates paragraphs; empty paragraphs are dropped.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        text = line.strip()
        if text == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        elif text:
            current.append(text)
    if current:
        paragraphs.append(" ".join(current))
    return tuple(paragraphs)


def parse_translation(text: str) -> list[Package]:
    """Parse Translation-en stanzas, in file order (duplicate names kept; see `apply_rules`)."""
    packages: list[Package] = []
    fields: dict[str, str] = {}
    desc_lines: list[str] = []
    start = 1
    in_desc = False

    def flush() -> None:
        if not fields:
            return
        if "Package" not in fields or "Description-en" not in fields:
            raise StarbucksError(
                f"line {start}: stanza without a Package or Description-en field; "
                "is the source a Debian Translation-en file?"
            )
        name, synopsis = fields["Package"].strip(), " ".join(fields["Description-en"].split())
        packages.append(Package(name, synopsis, parse_description(desc_lines)))

    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): keeps U+2028 etc.
        line = line.rstrip("\r")
        if not line.strip():
            flush()
            fields, desc_lines, in_desc = {}, [], False
            continue
        if not fields:
            start = lineno
        if line[0] in " \t":
            if not fields:
                raise StarbucksError(f"line {lineno}: continuation line outside a stanza")
            if in_desc:
                desc_lines.append(line)
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise StarbucksError(f"line {lineno}: expected `Field: value`, got {line[:60]!r}")
        fields[key.strip()] = value.strip()
        in_desc = key.strip() == "Description-en"
    flush()
    if not packages:
        raise StarbucksError("no package stanzas found; is the source a Debian Translation-en file?")
    return packages


def apply_rules(packages: Iterable[Package]) -> tuple[list[Package], dict[str, int]]:
    """Apply the filtering rules (module docstring); return kept packages (sorted) and drop counts."""
    dropped = {rule: 0 for rule in DROP_RULES}
    seen: set[str] = set()
    candidates: list[Package] = []
    for pkg in packages:
        if pkg.name in seen:
            dropped["duplicate_name"] += 1
        elif len(pkg.passage.split()) < MIN_PASSAGE_WORDS:
            dropped["short_passage"] += 1
        elif len(pkg.synopsis.split()) < MIN_SYNOPSIS_WORDS:
            dropped["short_synopsis"] += 1
        else:
            candidates.append(pkg)
        seen.add(pkg.name)

    representatives, dropped["family_collapse"] = collapse_near_duplicates(
        candidates, family=lambda p: normalize(p.paragraphs[0]), rank=lambda p: (len(p.name), p.name)
    )
    kept, dropped["duplicate_synopsis"] = drop_repeated(representatives, key=lambda p: normalize(p.synopsis).casefold())
    kept.sort(key=lambda p: p.name)
    return kept, dropped


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def build_full(
    kept: Sequence[Package], dev_size: int, test_size: int, num_negatives: int, bm25: BM25, progress: bool = True
) -> Collection:
    """The full collection: every kept passage, all queries, BM25 negatives for train queries."""
    by_name = {p.name: p for p in kept}
    splits = assign_splits(by_name, dev_size, test_size)
    train = [(n, by_name[n].synopsis, n) for n in splits["train"]]
    groups = mine_negatives(bm25, train, num_negatives, progress)
    return Collection(
        corpus={p.name: p.passage for p in kept},
        queries={p.name: p.synopsis for p in kept},
        splits=splits,
        positive={p.name: p.name for p in kept},
        groups=groups,
    )


def build_mini(
    full: Collection,
    bm25: BM25,
    num_queries: int = 200,
    neighbours: int = 20,
    num_groups: int = 300,
    min_negatives: int = 7,
    size: int = 3000,
    seed: int = 0,
    progress: bool = True,
) -> Collection:
    """A small but hard subset of `full` (the mini README spells out the recipe).

    1. the first `num_queries` dev and test queries (hash order) and their positives;
    2. their BM25 neighbours over the full corpus, rank by rank (every query's rank-1 hit, then
       every rank-2 hit, ...) up to rank `neighbours`, while the corpus has under `size` passages;
    3. `num_groups` train groups, cheapest first (fewest passages missing among the positive and
       top `min_negatives` negatives; ties: hash order); the missing passages are added;
    4. seeded random other passages while the corpus has under `size` passages.
    Training groups keep their negatives that are in the mini corpus (BM25 order).
    """
    corpus: dict[str, None] = {}  # insertion-ordered set

    def add(doc_id: str) -> None:
        corpus.setdefault(doc_id, None)

    splits = {s: full.splits[s][:num_queries] for s in EVAL_SPLITS}
    eval_queries = splits["dev"] + splits["test"]
    for qid in eval_queries:
        add(full.positive[qid])

    ranked = [
        [did for did, _ in bm25.search(full.queries[q], neighbours)]
        for q in tqdm(eval_queries, desc="mini: BM25 neighbours", disable=not progress)
    ]
    n_positives = len(corpus)
    for rank in range(neighbours):
        for hits in ranked:
            if rank < len(hits) and len(corpus) < size:
                add(hits[rank])
    n_neighbours = len(corpus) - n_positives
    complete = [next((r for r, d in enumerate(hits) if d not in corpus), len(hits)) for hits in ranked]

    groups_by_qid = {g["query_id"]: g for g in full.groups}
    train = [
        q
        for q in full.splits["train"]
        if q in groups_by_qid and len(groups_by_qid[q]["negative_document_ids"]) >= min_negatives
    ]

    def needed(qid: str) -> list[str]:
        group = groups_by_qid[qid]
        wanted = group["positive_document_ids"] + group["negative_document_ids"][:min_negatives]
        return [d for d in wanted if d not in corpus]

    costs = {q: len(needed(q)) for q in train}
    train = sorted(train, key=lambda q: costs[q])[:num_groups]  # stable: ties stay in hash order
    n_before = len(corpus)
    for qid in train:
        for did in needed(qid):
            add(did)
    n_group_passages = len(corpus) - n_before

    rest = sorted(set(full.corpus) - set(corpus))
    random.Random(seed).shuffle(rest)
    n_random = min(len(rest), max(0, size - len(corpus)))
    for did in rest[:n_random]:
        add(did)

    splits["train"] = sorted(train, key=lambda q: (split_key(q), q))
    groups = []
    for qid in splits["train"]:
        group = groups_by_qid[qid]
        negatives = [d for d in group["negative_document_ids"] if d in corpus]
        groups.append({**group, "negative_document_ids": negatives})
    qids = set(eval_queries) | set(train)
    return Collection(
        corpus={d: full.corpus[d] for d in corpus},
        queries={q: full.queries[q] for q in qids},
        splits=splits,
        positive={q: full.positive[q] for q in qids},
        groups=groups,
        info={
            "mini_composition": {
                "eval_positives": n_positives,
                "bm25_neighbours": n_neighbours,
                "added_for_train_groups": n_group_passages,
                "random": n_random,
            },
            "mini_neighbour_depth": {"min": min(complete, default=0), "max": max(complete, default=0)},
        },
    )


# --------------------------------------------------------------------------------------------
# Stats and README
# --------------------------------------------------------------------------------------------


def count_rows(stats: dict) -> list[tuple[str, object]]:
    """The README count table rows, derived from stats.json (also used by the tests)."""
    rows = common.count_rows(stats)
    if "source_packages" in stats:
        rows.insert(0, ("source stanzas", stats["source_packages"]))
        rows += [(f"dropped: {rule}", n) for rule, n in stats["dropped"].items()]
    if "mini_composition" in stats:
        rows += [(f"passages: {step}", n) for step, n in stats["mini_composition"].items()]
        rows += [(f"neighbour ranks complete ({k})", n) for k, n in stats["mini_neighbour_depth"].items()]
    return rows


FILES_DOC = """\
| file | content |
|---|---|
| `corpus.jsonl.gz` | `{"_id": package, "text": long description}` (no title), sorted by `_id` |
| `queries.jsonl.gz` | `{"_id": package, "text": synopsis}`, all splits, sorted by `_id` |
| `qrels/{train,dev,test}.tsv` | `query-id  corpus-id  score` (header; score 1; query id = doc id) |
| `train.jsonl.gz` | `{"query_id", "query", "positive_document_ids": [id], "negative_document_ids": [ids]}` |
| `stats.json` | the counts and BM25 scores below, machine-readable |
"""

RULES_DOC = """\
Query = the package's one-line synopsis (`Description-en:` first line); relevant passage = its
long description: the continuation lines, each stripped, lines of a paragraph joined with single
spaces, paragraphs (separated by ` .` lines) joined with newlines. Rules, in order (a dropped
package is counted under the first rule it fails):

1. `duplicate_name`: a package name repeated in the file (other architectures) keeps its first stanza;
2. `short_passage`: passages under 15 words (whitespace-separated) are dropped;
3. `short_synopsis`: synopses under 3 words are dropped;
4. `family_collapse`: packages whose passages share the same first paragraph (whitespace-normalised)
   keep one member, the one with the shortest name (ties: lexicographically smallest);
5. `duplicate_synopsis`: synopses occurring more than once after step 4 (case-insensitive,
   whitespace-normalised) are dropped, all of them, so each query has exactly one relevant passage.

Splits: kept packages sorted by the sha1 hex digest of their name: the first {dev} are `dev`, the
next {test} `test`, the rest `train`. The corpus holds every kept passage (train positives included).
Training groups: one per train query, the BM25 (bm25s, English stopwords, stemmer: {stemmer})
top {negatives} passages of the whole corpus with the positive excluded, best first (ties: by id);
only passages sharing a term with the query (score > 0) count, so a few groups have fewer.
"""

MINI_DOC = """\
Derived deterministically from `{full}` by the same builder:

1. the first {q} `dev` and first {q} `test` queries (hash order) and their positives;
2. BM25 neighbours of those queries over the *full* corpus, rank by rank (every query's rank-1
   hit, then every rank-2 hit, ...) up to rank {nb}, while the corpus has fewer than {size} passages,
   so each query's strongest lexical distractors are present;
3. {g} train groups among those with at least {mn} negatives, cheapest first: fewest passages
   missing from the corpus among the group's positive and top {mn} negatives (ties: hash order);
   the missing ones are added, so every group keeps its positive and at least {mn} negatives;
4. seeded (seed {seed}) random other passages while the corpus has fewer than {size} passages.

Training groups keep the negatives (in BM25 order) that are in the mini corpus. BM25 scores below
are computed over the mini corpus. The full collection's recipe follows.
"""


def write_readme(
    out: Path,
    title: str,
    stats: dict,
    source: Path,
    source_sha256: str,
    date: str,
    command: str,
    recipe: str,
) -> None:
    """Write the dataset README (the only file carrying the build date)."""
    text = f"""# {title}

Debian package descriptions as a retrieval collection: query = a package's one-line synopsis,
relevant passage = its long description. Built by `corpora/debian_pkgs.py`.

- Source: `{source.name}` (sha256 `{source_sha256}`)
- Build date: {date}
- Command: `{command}`

## Files

{FILES_DOC}
## Counts

{count_table(count_rows(stats))}

## Recipe

{recipe}
## BM25 reference

bm25s (English stopwords, stemmer: {stats["bm25"]["stemmer"]}), each split's queries searched over
the whole corpus (top {stats["bm25"]["depth"]}), scored with `ir_measures` (`RR@10` is MRR@10).
`corpora.common.bm25_reference(dir)` recomputes these.

{bm25_table(stats["bm25"]["scores"])}

## License

{LICENSE_NOTE}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m corpora.debian_pkgs",
        description="Build the debian-pkgs retrieval collection (and its mini subset) from Translation-en.",
    )
    p.add_argument("--source", default=DEFAULT_SOURCE, help="Translation-en file (.lz4, .gz, .xz or plain)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory of the full collection")
    p.add_argument("--mini-out", default=DEFAULT_MINI_OUT, help="output directory of the mini subset ('' to skip)")
    add_common_arguments(p, dev_size=2000, test_size=2000, negatives=30)
    p.add_argument("--mini-queries", type=int, default=200, help="dev and test queries each in the mini set")
    p.add_argument("--mini-neighbours", type=int, default=20, help="deepest BM25 rank of neighbours added")
    p.add_argument("--mini-groups", type=int, default=300, help="training groups in the mini set")
    p.add_argument("--mini-min-negatives", type=int, default=7, help="negatives each mini group keeps")
    p.add_argument("--mini-size", type=int, default=3000, help="target passages in the mini corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of the mini set's random filler passages")
    args = p.parse_args(argv)
    check_date(args.date)
    return args


def _command(args: argparse.Namespace) -> str:
    """The canonical command that rebuilds these files (every data-affecting option spelled out)."""
    parts = ["python", "-m", "corpora.debian_pkgs", "--source", args.source, "--out", args.out]
    parts += ["--mini-out", args.mini_out]
    for opt in (
        "dev_size",
        "test_size",
        "negatives",
        "stemmer",
        "mini_queries",
        "mini_neighbours",
        "mini_groups",
        "mini_min_negatives",
        "mini_size",
        "seed",
    ):
        parts += ["--" + opt.replace("_", "-"), str(getattr(args, opt))]
    return shlex.join(parts)


def build(args: argparse.Namespace) -> dict:
    """Run the whole build; return {'full': stats, 'mini': stats or None}."""
    t0 = time.time()
    progress = not args.no_progress
    source = Path(args.source)
    text = read_source(source)
    sha = sha256_file(source)
    try:
        packages = parse_translation(text)
    except StarbucksError as err:
        raise StarbucksError(f"{source}: {err}") from None
    kept, dropped = apply_rules(packages)
    log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    log(f"{len(packages)} stanzas, {len(kept)} kept; dropped {dropped}")

    bm25 = BM25([p.name for p in kept], [p.passage for p in kept], stemmer=args.stemmer, progress=progress)
    full = build_full(kept, args.dev_size, args.test_size, args.negatives, bm25, progress)
    out = Path(args.out)
    full.write(out)
    stats = {
        "source": source.name,
        "source_sha256": sha,
        "source_packages": len(packages),
        "dropped": dropped,
        **collection_stats(full),
        "bm25": {
            "stemmer": bm25.stemmer_name,
            "depth": BM25_DEPTH,
            "scores": bm25_reference(out, bm25=bm25, stemmer=bm25.stemmer_name, progress=progress),
        },
    }
    write_stats(out, stats)
    command = _command(args)
    recipe = RULES_DOC.format(
        dev=args.dev_size, test=args.test_size, stemmer=bm25.stemmer_name, negatives=args.negatives
    )
    write_readme(out, "debian-pkgs", stats, source, sha, args.date, command, recipe)
    log(f"wrote {out} ({time.time() - t0:.0f}s)")

    mini_stats = None
    if args.mini_out:
        mini = build_mini(
            full,
            bm25,
            args.mini_queries,
            args.mini_neighbours,
            args.mini_groups,
            args.mini_min_negatives,
            args.mini_size,
            args.seed,
            progress,
        )
        mout = Path(args.mini_out)
        mini.write(mout)
        mini_stats = {
            "source": source.name,
            "source_sha256": sha,
            "derived_from": out.name,
            **collection_stats(mini),
            "bm25": {
                "stemmer": bm25.stemmer_name,
                "depth": BM25_DEPTH,
                "scores": bm25_reference(mout, stemmer=bm25.stemmer_name, progress=progress),
            },
        }
        write_stats(mout, mini_stats)
        mini_recipe = MINI_DOC.format(
            full=out.name,
            q=args.mini_queries,
            g=args.mini_groups,
            mn=args.mini_min_negatives,
            nb=args.mini_neighbours,
            size=args.mini_size,
            seed=args.seed,
        )
        write_readme(mout, "debian-pkgs-mini", mini_stats, source, sha, args.date, command, mini_recipe + "\n" + recipe)
        log(f"wrote {mout} ({time.time() - t0:.0f}s)")
    return {"full": stats, "mini": mini_stats}


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m corpora.debian_pkgs`."""
    build(_parse_args(argv))


if __name__ == "__main__":
    main()
