"""Collections: corpus, queries, qrels and training groups from local files, the HF hub or ir_datasets.

Sources are strings:
- a BEIR directory (`corpus.jsonl[.gz]`, `queries.jsonl[.gz]`, `qrels/<split>.tsv[.gz]`);
- a file: corpus/queries `.jsonl[.gz]` (`_id`, `text`, optional `title`) or `.tsv` (`id<TAB>text`,
  e.g. MS MARCO's `collection.tsv` or TREC topics); qrels in BEIR TSV or TREC format;
- `irds:<id>`: an `ir_datasets` id (`irds:msmarco-passage`, `irds:msmarco-passage/dev/small`,
  `irds:msmarco-passage/trec-dl-2019/judged`, ...);
- `hf:<id>` for training groups: a hub dataset in Tevatron's format (`hf:Tevatron/msmarco-passage-aug`).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from retrieval.errors import StarbucksError
from retrieval.io import iter_lines, read_jsonl
from retrieval.names import parse_names

Qrels = dict[str, dict[str, int]]
log = logging.getLogger(__name__)

IRDS = "irds:"
HF = "hf:"


def _find(directory: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".jsonl.gz", ".tsv", ".tsv.gz"):
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _irds(dataset_id: str):
    try:
        import ir_datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise StarbucksError("ir_datasets is not installed; pip install ir_datasets") from None
    try:
        return ir_datasets.load(dataset_id)
    except KeyError:
        raise StarbucksError(
            f"unknown ir_datasets id {dataset_id!r}; see https://ir-datasets.com for valid ids"
        ) from None


def _passage_text(title: str | None, text: str | None) -> str:
    title, text = (title or "").strip(), (text or "").strip()
    return f"{title} {text}" if title else text


# ---------------------------------------------------------------- corpus


def _corpus_file(source: str) -> Path:
    p = Path(source)
    if p.is_dir():
        f = _find(p, "corpus")
        if f is None:
            raise StarbucksError(f"{p} has no corpus.jsonl[.gz] or corpus.tsv; is it a BEIR collection directory?")
        return f
    if not p.is_file():
        raise StarbucksError(f"corpus {p} not found; set data.corpus to a BEIR directory, a corpus file or irds:<id>")
    return p


def _iter_tsv(path: Path, what: str, columns: int = 2) -> Iterator[tuple[int, list[str]]]:
    for lineno, line in iter_lines(path, what):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < columns:
            raise StarbucksError(
                f"{path} line {lineno}: expected {columns} tab-separated columns, got {len(parts)}; fix that line"
            )
        yield lineno, parts


def _iter_id_text_jsonl(path: Path, what: str, text_key: str = "text") -> Iterator[tuple[int, str, str]]:
    for lineno, obj in read_jsonl(path, what):
        if "_id" not in obj or text_key not in obj:
            raise StarbucksError(f"{path} line {lineno}: a {what} row needs '_id' and '{text_key}' fields")
        yield lineno, str(obj["_id"]), _passage_text(obj.get("title"), obj[text_key])


def _corpus_rows(source: str) -> tuple[str, Iterator[tuple[int, str, str]]]:
    """`(unit, rows)`: rows are `(number, doc_id, text)`; "<unit> <number>" says where a row is ("<file> line
    N", "<source> record N"), formatted only when an error needs it."""
    if source.startswith(IRDS):
        ds = _irds(source[len(IRDS) :])
        docs = ds.docs_iter()
        return f"{source} record", (
            (n, d.doc_id, _passage_text(getattr(d, "title", None), d.text)) for n, d in enumerate(docs, 1)
        )
    path = _corpus_file(source)
    if ".jsonl" in path.name:
        return f"{path} line", _iter_id_text_jsonl(path, "corpus")
    return f"{path} line", (
        (n, parts[0], _passage_text(parts[2] if len(parts) > 2 else None, parts[1]))
        for n, parts in _iter_tsv(path, "corpus")
    )


def iter_corpus(source: str) -> Iterator[tuple[str, str]]:
    """Stream `(doc_id, text)` pairs of a corpus (title and text joined when there is a title).

    A passage id seen twice (its run files would list one passage twice) and a corpus without
    passages are refused: the first at the line of the second occurrence, the second at the end.
    The ids seen are held in a set while streaming (MS MARCO's 8.8M: about 0.6 GB)."""
    unit, rows = _corpus_rows(source)
    seen: set[str] = set()
    for number, doc_id, text in rows:
        if doc_id in seen:
            raise StarbucksError(
                f"{unit} {number}: passage id {doc_id!r} appears a second time; passage ids must "
                f"be unique: remove or rename the duplicate"
            )
        seen.add(doc_id)
        yield doc_id, text
    if not seen:
        raise StarbucksError(f"corpus {source} holds no passages; point data.corpus at a non-empty collection")


def corpus_size(source: str) -> int | None:
    """Number of passages when cheaply known (ir_datasets), else None."""
    if source.startswith(IRDS):
        return _irds(source[len(IRDS) :]).docs_count()
    return None


def load_corpus(source: str) -> dict[str, str]:
    """The whole corpus as `{doc_id: text}` (for training-group lookups; small collections)."""
    return dict(iter_corpus(source))


# ---------------------------------------------------------------- queries and qrels


def _unique_queries(rows: Iterable[tuple[int, str, str]], unit: str) -> dict[str, str]:
    """`{qid: text}` of `(number, qid, text)` rows; a query id seen twice is refused ("<unit> <number>")."""
    queries: dict[str, str] = {}
    first: dict[str, int] = {}
    for number, qid, text in rows:
        if qid in queries:
            raise StarbucksError(
                f"{unit} {number}: query id {qid!r} appears a second time (first at {_word(unit)} "
                f"{first[qid]}); query ids must be unique: remove or rename the duplicate"
            )
        queries[qid], first[qid] = text, number
    return queries


def read_queries_file(path: str | os.PathLike) -> dict[str, str]:
    """Queries from BEIR `queries.jsonl[.gz]` or a TREC/MS MARCO topics TSV (`qid<TAB>text`); a repeated
    query id is refused."""
    path = Path(path)
    if ".jsonl" in path.name:
        return _unique_queries(_iter_id_text_jsonl(path, "queries"), f"{path} line")
    return _unique_queries(
        ((n, parts[0].strip(), parts[1].strip()) for n, parts in _iter_tsv(path, "topics")), f"{path} line"
    )


def _word(unit: str) -> str:
    """The last word of a unit ("line" of "<file> line")."""
    return unit.rsplit(" ", 1)[-1]


class _QrelsBuilder:
    """Qrels from `(number, qid, docid, relevance)` judgments. A judgment repeated with the same grade is
    kept once (a warning says how many); one repeated with another grade is refused ("<unit> <number>")."""

    def __init__(self, unit: str):
        self.unit, self.qrels, self.first, self.repeats = unit, {}, {}, []

    def add(self, number: int, qid: str, did: str, rel: int) -> None:
        judged = self.qrels.setdefault(qid, {})
        if did in judged:
            first = self.first[qid, did]
            if judged[did] != rel:
                raise StarbucksError(
                    f"{self.unit} {number}: query {qid!r} judges passage {did!r} {rel}, but {_word(self.unit)} {first} "
                    f"judged it {judged[did]}; keep the line with the right grade and remove the other"
                )
            self.repeats.append((number, first))
            return
        judged[did], self.first[qid, did] = rel, number

    def done(self) -> Qrels:
        if self.repeats:
            number, first = self.repeats[0]
            source, word = self.unit.rsplit(" ", 1)
            log.warning(
                "%s: %d judgment(s) repeat an earlier one with the same grade (first: %s %d repeats %s %d); "
                "each is kept once",
                source,
                len(self.repeats),
                word,
                number,
                word,
                first,
            )
        return self.qrels


def read_qrels_file(path: str | os.PathLike) -> Qrels:
    """Qrels from a BEIR TSV (`query-id corpus-id score` with header) or a TREC file (`qid 0 docid rel`).
    A (query, passage) pair judged twice: kept once with a warning if the grades agree, refused if not."""
    path = Path(path)
    qrels = _QrelsBuilder(f"{path} line")
    width = None  # fields per line, fixed by the first data line: 3 (BEIR) or 4 (TREC)
    for lineno, line in iter_lines(path, "qrels"):
        parts = line.split()
        if not parts:
            continue
        if width is None and parts[0] in ("query-id", "query_id", "qid"):
            continue  # BEIR header
        if width is None and len(parts) in (3, 4):
            width = len(parts)
        if len(parts) != width:
            want = "'qid 0 docid rel' (TREC)" if width == 4 else "'qid docid rel' (BEIR)"
            raise StarbucksError(f"{path} line {lineno}: expected {want}, got {len(parts)} fields")
        qid, did, rel = (parts[0], parts[2], parts[3]) if width == 4 else parts
        try:
            grade = int(float(rel))
        except ValueError:
            raise StarbucksError(f"{path} line {lineno}: relevance {rel!r} is not a number") from None
        qrels.add(lineno, qid, did, grade)
    return qrels.done()


@dataclass
class EvalSplit:
    """The queries and relevance judgments of one evaluation split."""

    name: str
    queries: dict[str, str]
    qrels: Qrels = field(default_factory=dict)

    def __post_init__(self):
        unknown = [q for q in self.qrels if q not in self.queries]
        if unknown:
            raise StarbucksError(
                f"split {self.name!r}: qrels name {len(unknown)} queries that are not in its queries "
                f"(first: {unknown[0]!r}); the queries and qrels files do not belong together"
            )
        if self.qrels:  # evaluate only the judged queries (like DL20's 54 of 200)
            self.queries = {q: t for q, t in self.queries.items() if q in self.qrels}


def load_split(name: str, source) -> EvalSplit:
    """Load split `name` from a BEIR directory, `irds:<id>`, or `{queries: FILE, qrels: FILE}`."""
    if isinstance(source, Mapping):
        if "queries" not in source:
            raise StarbucksError(f"data.eval_splits.{name} needs a 'queries' file (and usually 'qrels')")
        queries = read_queries_file(source["queries"])
        qrels = read_qrels_file(source["qrels"]) if source.get("qrels") else {}
        return EvalSplit(name, queries, qrels)
    source = str(source)
    if source.startswith(IRDS):
        ds = _irds(source[len(IRDS) :])
        queries = _unique_queries(
            ((n, q.query_id, q.text) for n, q in enumerate(ds.queries_iter(), 1)), f"{source} queries record"
        )
        qrels = _QrelsBuilder(f"{source} qrels record")
        for n, r in enumerate(ds.qrels_iter(), 1):
            qrels.add(n, r.query_id, r.doc_id, int(r.relevance))
        return EvalSplit(name, queries, qrels.done())
    directory = Path(source)
    if not directory.is_dir():
        raise StarbucksError(
            f"data.eval_splits.{name} = {source!r} is not a directory, irds:<id>, or {{queries, qrels}} mapping"
        )
    qfile = _find(directory, "queries")
    qrels_file = _find(directory / "qrels", name)
    if qfile is None:
        raise StarbucksError(f"{directory} has no queries.jsonl[.gz]")
    if qrels_file is None:
        raise StarbucksError(f"{directory}/qrels has no {name}.tsv[.gz]; available: {_available_splits(directory)}")
    return EvalSplit(name, read_queries_file(qfile), read_qrels_file(qrels_file))


def _available_splits(directory: Path) -> list[str]:
    qdir = directory / "qrels"
    return sorted(p.name.split(".")[0] for p in qdir.glob("*.tsv*")) if qdir.is_dir() else []


def load_eval_splits(splits: Mapping, names=None) -> dict[str, EvalSplit]:
    """Load the configured eval splits (all, or those in `names`)."""
    names = parse_names(names) or list(splits)
    out = {}
    for n in names:
        if n not in splits:
            raise StarbucksError(f"unknown eval split {n!r}; configured splits are {sorted(splits)} (data.eval_splits)")
        out[n] = load_split(n, splits[n])
    return out


# ---------------------------------------------------------------- training groups


@dataclass
class TrainGroup:
    """One training query with its positive and hard-negative passage texts (and the positives' ids
    where the source gives them: a held-out query's qrels, `heldout_split`)."""

    query_id: str
    query: str
    positives: list[str]
    negatives: list[str]
    positive_ids: tuple[str, ...] = ()


def _group_from_row(row: dict, corpus: Mapping[str, str] | None, where: str) -> TrainGroup:
    qid = str(row.get("query_id", ""))
    query = row.get("query")
    if query is None:
        raise StarbucksError(f"{where}: training group has no 'query' field")
    if "positive_passages" in row:  # Tevatron inline format
        pos = [_passage_text(p.get("title"), p.get("text")) for p in row["positive_passages"]]
        neg = [_passage_text(p.get("title"), p.get("text")) for p in row.get("negative_passages") or []]
        pos_ids = tuple(str(p["docid"]) for p in row["positive_passages"] if p.get("docid") is not None)
    elif "positive_document_ids" in row:
        if corpus is None:
            raise StarbucksError(
                f"{where}: ids-only training groups need a corpus (set data.train_corpus or data.corpus)"
            )

        def texts(ids):
            out = []
            for d in ids:
                d = str(d)
                if d not in corpus:
                    raise StarbucksError(
                        f"{where}: document id {d!r} is not in the corpus; check data.train_corpus / data.corpus"
                    )
                out.append(corpus[d])
            return out

        pos = texts(row["positive_document_ids"])
        neg = texts(row.get("negative_document_ids") or [])
        pos_ids = tuple(str(d) for d in row["positive_document_ids"])
    else:
        raise StarbucksError(
            f"{where}: a training group needs 'positive_document_ids' (ids) or 'positive_passages' (Tevatron inline)"
        )
    if not pos:
        raise StarbucksError(f"{where}: training group for query {qid!r} has no positive passage")
    return TrainGroup(qid, str(query), pos, neg, pos_ids)


def load_train_groups(
    source: str, corpus_source: str | None = None, split: str = "train", max_groups: int | None = None
) -> list[TrainGroup]:
    """Training groups from a local JSONL (ids-only or inline texts) or `hf:<dataset id>`; a query id with a
    second group is refused (its positives and negatives belong in one)."""
    groups: list[TrainGroup] = []
    first: dict[str, str] = {}

    def add(group: TrainGroup, unit: str, number: int) -> None:
        if group.query_id and group.query_id in first:
            raise StarbucksError(
                f"{unit} {number}: query id {group.query_id!r} has a second training group (first at "
                f"{first[group.query_id]}); merge its positives and negatives into one group, "
                f"or give the query another id"
            )
        first[group.query_id] = f"{_word(unit)} {number}"
        groups.append(group)

    if source.startswith(HF):
        try:
            import datasets
        except ImportError:  # pragma: no cover - a declared dependency
            raise StarbucksError("the `datasets` package is needed for hf: sources; pip install datasets") from None
        ds = datasets.load_dataset(source[len(HF) :], split=split)
        for i, row in enumerate(ds):
            if max_groups is not None and i >= max_groups:
                break
            add(_group_from_row(row, None, f"{source} row {i}"), f"{source} row", i)
        return groups
    path = Path(source)
    if not path.is_file():
        raise StarbucksError(f"training groups {path} not found; set data.train to a JSONL file or hf:<dataset id>")
    corpus = None
    for lineno, row in read_jsonl(path, "training groups"):
        if corpus is None and "positive_document_ids" in row and corpus_source:
            corpus = load_corpus(corpus_source)
        add(_group_from_row(row, corpus, f"{path} line {lineno}"), f"{path} line", lineno)
        if max_groups is not None and len(groups) >= max_groups:
            break
    if not groups:
        raise StarbucksError(f"training groups {path} is empty")
    return groups


HELDOUT = "heldout"  # the split name of held-back training queries (train.holdout_queries)


def hold_out(groups: list[TrainGroup], count: int, source: str) -> tuple[list[TrainGroup], EvalSplit]:
    """Hold `count` training queries back: the groups left to train on, and the held-back queries as
    the `heldout` split (qrels: each one's positive passages, relevance 1). The same queries whatever
    the run's seed or method (a fixed draw over the sorted query ids), so runs validate alike."""
    qids = sorted({g.query_id for g in groups})
    if count >= len(qids):
        raise StarbucksError(
            f"train.holdout_queries = {count} leaves nothing to train on ({source} has "
            f"{len(qids)} queries); hold back fewer"
        )
    chosen = set(random.Random(HELDOUT).sample(qids, count))
    kept = [g for g in groups if g.query_id in chosen]
    missing = next((g for g in kept if not g.positive_ids), None)
    if missing is not None:
        raise StarbucksError(
            f"train.holdout_queries needs the positives' passage ids, but {source} gives none for "
            f"query {missing.query_id!r} (ids-only groups or Tevatron's docid); set it to 0"
        )
    split = EvalSplit(
        HELDOUT, {g.query_id: g.query for g in kept}, {g.query_id: {d: 1 for d in g.positive_ids} for g in kept}
    )
    return [g for g in groups if g.query_id not in chosen], split


def sample_negatives(group: TrainGroup, count: int, epoch: int, seed: int) -> list[str]:
    """`count` hard negatives of a group for `epoch`, rotating through its list across epochs.

    The list is shuffled once per group (seeded); epoch `e` takes the next `count` items
    cyclically, so every negative is used before any repeats. Too few negatives are padded
    by repetition.
    """
    negs = group.negatives
    if count <= 0:
        return []
    if not negs:
        raise StarbucksError(f"query {group.query_id!r} has no hard negatives; group_size must be 1 or add negatives")
    order = list(range(len(negs)))
    random.Random(f"{seed}:{group.query_id}").shuffle(order)
    start = (epoch * count) % len(order)
    return [negs[order[(start + i) % len(order)]] for i in range(count)]


# ---------------------------------------------------------------- qrels against a corpus


def qrels_coverage(qrels: Qrels, passage_ids) -> dict:
    """How many of the qrels' relevant passages (relevance > 0) are in a corpus (`passage_ids`: a set)."""
    relevant = sorted({d for docs in qrels.values() for d, rel in docs.items() if rel > 0})
    missing = [d for d in relevant if d not in passage_ids]
    return {"relevant": len(relevant), "missing": len(missing), "first_missing": missing[0] if missing else None}


def check_coverage(split: str, coverage: dict, corpus: str) -> str | None:
    """Refuse qrels none of whose relevant passages is in the corpus; a warning line when some are missing."""
    relevant, missing = coverage["relevant"], coverage["missing"]
    if relevant and missing == relevant:
        raise StarbucksError(
            f"split {split!r}: none of its {relevant} relevant passages is in the corpus {corpus} (first: "
            f"{coverage['first_missing']!r}); its qrels belong to another collection: fix data.eval_splits.{split} "
            f"or data.corpus"
        )
    if missing:
        return (
            f"split {split!r}: {missing} of its {relevant} relevant passages are not in the corpus {corpus} "
            f"(first: {coverage['first_missing']!r}); scores on this split are capped below their true value"
        )
    return None
