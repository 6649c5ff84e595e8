"""Tests of the debian-pkgs builder (on a hand-written sample) and of the committed collections."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from corpora import common, debian_pkgs
from retrieval.errors import StarbucksError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SAMPLE = TESTS / "data" / "Translation-en-sample"
SAMPLE_ARGS = [
    "--source",
    str(SAMPLE),
    "--out",
    "full",
    "--mini-out",
    "mini",
    "--dev-size",
    "4",
    "--test-size",
    "4",
    "--negatives",
    "5",
    "--mini-queries",
    "2",
    "--mini-neighbours",
    "3",
    "--mini-groups",
    "4",
    "--mini-min-negatives",
    "2",
    "--mini-size",
    "14",
    "--date",
    "2024-01-01",
    "--no-progress",
]

# Written by hand from the sample file, not computed by the builder.
EXPECTED_KEPT = [
    "abook",
    "bandwidthd-lite",
    "beep-edge",
    "chess-clock",
    "dnsprobe",
    "eventlog-viewer",
    "fontforge-scripts",
    "gitwatch-notify",
    "hashsum-gui",
    "jsonlint-py",
    "kanban-cli",
    "libzork1",
    "mpx-qt",
    "ocrmypages",
    "pdfsplit",
    "quill-plugins",
    "qux-data",
    "rsync-backup",
    "sqlite-browser",
    "termplot",
    "unitconv",
    "vpn-status",
    "wavtrim",
    "xkcd-fetch",
    "yamlfmt",
    "zipcheck",
]
EXPECTED_DROPPED = {
    "duplicate_name": 1,  # second `abook` stanza
    "short_passage": 4,  # aspell-tiny (10 words), bench-edge (14), quill (11), netcat-tiny (0)
    "short_synopsis": 2,  # calcium, qux
    "family_collapse": 5,  # libzork-dev, zork-doc, zork-utils; qux-server; mpx-gtk
    "duplicate_synopsis": 2,  # imgconv, picshift
}
DATASETS = ["data/debian-pkgs", "data/debian-pkgs-mini"]


@contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _build_sample(workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    with _chdir(workdir):
        debian_pkgs.main(SAMPLE_ARGS)
    return workdir


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _qrels(path: Path) -> list[tuple[str, str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    return [tuple(line.split("\t")) for line in lines[1:]]


@pytest.fixture(scope="module")
def sample_build(tmp_path_factory) -> Path:
    return _build_sample(tmp_path_factory.mktemp("build-a"))


@pytest.fixture(scope="module")
def corpus(sample_build) -> dict[str, str]:
    return {r["_id"]: r["text"] for r in _jsonl(sample_build / "full" / "corpus.jsonl.gz")}


@pytest.fixture(scope="module")
def queries(sample_build) -> dict[str, str]:
    return {r["_id"]: r["text"] for r in _jsonl(sample_build / "full" / "queries.jsonl.gz")}


# ------------------------------------------------------------------------------------ determinism


def test_rebuild_is_byte_identical(sample_build, tmp_path):
    again = _build_sample(tmp_path / "build-b")
    first, second = _files(sample_build), _files(again)
    assert set(first) >= {
        "full/corpus.jsonl.gz",
        "full/queries.jsonl.gz",
        "full/train.jsonl.gz",
        "full/qrels/dev.tsv",
        "full/README.md",
        "full/stats.json",
        "mini/corpus.jsonl.gz",
        "mini/README.md",
    }
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name


def test_gzip_has_no_timestamp_or_name(sample_build):
    for path in (sample_build / "full").glob("*.gz"):
        header = path.read_bytes()[:10]
        assert header[4:8] == b"\0\0\0\0", path  # mtime 0
        assert header[3] & 0x08 == 0, path  # FNAME flag unset


# ------------------------------------------------------------------------------------ rules


def test_kept_packages(corpus, queries):
    assert sorted(corpus) == EXPECTED_KEPT
    assert sorted(queries) == EXPECTED_KEPT


def test_drop_counts(sample_build):
    stats = json.loads((sample_build / "full" / "stats.json").read_text())
    assert stats["dropped"] == EXPECTED_DROPPED
    assert stats["source_packages"] == 40
    assert stats["passages"] == len(EXPECTED_KEPT)


def test_short_passage_dropped(corpus):
    for name in ("aspell-tiny", "bench-edge", "quill", "netcat-tiny"):
        assert name not in corpus
    assert "beep-edge" in corpus  # exactly 15 words
    assert len(corpus["beep-edge"].split()) == 15


def test_short_synopsis_dropped(corpus, queries):
    assert "calcium" not in corpus  # "Calendar tool"
    assert queries["chess-clock"] == "simple calendar tool"  # exactly 3 words


def test_family_collapsed_to_shortest_name(corpus):
    # libzork1 and zork-doc both have 8 characters: the lexicographically smaller one wins;
    # zork-doc's first paragraph is wrapped differently but is the same text.
    assert "libzork1" in corpus
    for name in ("libzork-dev", "zork-doc", "zork-utils"):
        assert name not in corpus
    assert corpus["libzork1"].endswith("This package contains the shared library.")
    # qux (shortest) fails the synopsis rule first, so qux-data represents the family.
    assert "qux-data" in corpus and "qux-server" not in corpus and "qux" not in corpus
    # quill (shortest) fails the passage rule first, so quill-plugins survives.
    assert "quill-plugins" in corpus and "quill" not in corpus
    assert "mpx-qt" in corpus and "mpx-gtk" not in corpus


def test_duplicate_synopsis_dropped(corpus, queries):
    # "Command line tool for converting images" vs "command  line tool for Converting images"
    assert "imgconv" not in corpus and "picshift" not in corpus
    # mpx-gtk / mpx-qt share a synopsis, but the family collapse leaves only mpx-qt.
    assert queries["mpx-qt"] == "multimedia player for the desktop"


def test_duplicate_name_keeps_first_stanza(corpus, queries):
    assert queries["abook"] == "text-based ncurses address book application"
    assert "second stanza" not in corpus["abook"]


def test_paragraphs_joined_and_separated_by_newline(corpus):
    assert corpus["abook"] == (
        "abook is a text-based address book program designed to use with the mutt mail client. "
        "It supports vCard import and export.\n"
        "Contacts can be searched by name, e-mail address or nickname, and the address book can "
        "be exported to several other formats."
    )
    # consecutive and trailing " ." lines give no empty paragraphs
    assert corpus["fontforge-scripts"] == (
        "These Python scripts automate common font editing tasks such as renaming glyphs, merging "
        "font files, fixing metrics and generating web font formats.\n"
        "They require the FontForge Python module."
    )
    # indented (verbatim) lines are stripped and joined like any other line
    assert corpus["gitwatch-notify"].endswith(
        "\nFeatures: * watches any number of repositories * configurable polling interval * quiet hours"
    )


def test_parse_description_unit():
    lines = [" First line", " second  line ", " .", " .", "  * item", " ."]
    assert debian_pkgs.parse_description(lines) == ("First line second  line", "* item")


# ------------------------------------------------------------------------------------ structure


def _check_dataset(root: Path) -> dict:
    """Structural invariants of a built dataset; returns per-split query ids."""
    corpus_rows = _jsonl(root / "corpus.jsonl.gz")
    query_rows = _jsonl(root / "queries.jsonl.gz")
    groups = _jsonl(root / "train.jsonl.gz")
    assert [r["_id"] for r in corpus_rows] == sorted(r["_id"] for r in corpus_rows)
    assert [r["_id"] for r in query_rows] == sorted(r["_id"] for r in query_rows)
    assert all(set(r) == {"_id", "text"} and r["text"] for r in corpus_rows + query_rows)
    doc_ids = {r["_id"] for r in corpus_rows}
    assert len(doc_ids) == len(corpus_rows)
    splits = {}
    per_query: dict[str, int] = {}
    for split in common.SPLITS:
        rows = _qrels(root / "qrels" / f"{split}.tsv")
        assert rows == sorted(rows)
        splits[split] = [q for q, _, _ in rows]
        for qid, did, score in rows:
            assert score == "1" and did == qid and did in doc_ids
            per_query[qid] = per_query.get(qid, 0) + 1
    assert all(n == 1 for n in per_query.values())  # one qrel per query, splits disjoint
    assert set(per_query) == {r["_id"] for r in query_rows}
    assert [g["query_id"] for g in groups] == sorted(splits["train"])
    texts = {r["_id"]: r["text"] for r in query_rows}
    for g in groups:
        assert g["query"] == texts[g["query_id"]]
        assert g["positive_document_ids"] == [g["query_id"]]
        negs = g["negative_document_ids"]
        assert g["query_id"] not in negs
        assert len(set(negs)) == len(negs) and set(negs) <= doc_ids
    return splits


def _by_hash(names):
    return sorted(names, key=lambda n: hashlib.sha1(n.encode()).hexdigest())


def test_full_structure_and_splits(sample_build):
    splits = _check_dataset(sample_build / "full")
    ordered = _by_hash(EXPECTED_KEPT)
    assert sorted(splits["dev"]) == sorted(ordered[:4])
    assert sorted(splits["test"]) == sorted(ordered[4:8])
    assert sorted(splits["train"]) == sorted(ordered[8:])
    groups = _jsonl(sample_build / "full" / "train.jsonl.gz")
    assert max(len(g["negative_document_ids"]) for g in groups) == 5


def test_mini_structure(sample_build):
    full_corpus = {r["_id"]: r["text"] for r in _jsonl(sample_build / "full" / "corpus.jsonl.gz")}
    mini_corpus = {r["_id"]: r["text"] for r in _jsonl(sample_build / "mini" / "corpus.jsonl.gz")}
    assert mini_corpus.items() <= full_corpus.items()
    splits = _check_dataset(sample_build / "mini")
    ordered = _by_hash(EXPECTED_KEPT)
    assert sorted(splits["dev"]) == sorted(ordered[:2])
    assert sorted(splits["test"]) == sorted(ordered[4:6])
    assert len(splits["train"]) == 4
    stats = json.loads((sample_build / "mini" / "stats.json").read_text())
    assert sum(stats["mini_composition"].values()) == len(mini_corpus) >= 14
    assert all(len(g["negative_document_ids"]) >= 2 for g in _jsonl(sample_build / "mini" / "train.jsonl.gz"))


# ------------------------------------------------------------------------------------ errors


def test_missing_source_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        debian_pkgs.main(["--source", str(tmp_path / "nope.lz4"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "apt-get update -o Acquire::Languages=en" in err


def test_not_a_translation_file(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("hello world\n")
    with pytest.raises(StarbucksError, match="Field: value"):
        debian_pkgs.parse_translation(debian_pkgs.read_source(bad))


# ------------------------------------------------------------------------------------ committed data


def _readme_counts(readme: Path) -> dict[str, str]:
    """The `| count | value |` table of a dataset README."""
    text = readme.read_text(encoding="utf-8")
    section = text.split("## Counts", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] not in ("count", "---"):
            rows[cells[0]] = cells[1]
    return rows


@pytest.mark.parametrize("name", DATASETS)
def test_committed_counts_match_files(name):
    root = REPO / name
    if not (root / "stats.json").exists():
        pytest.fail(f"{name} is missing; build it with `python -m corpora.debian_pkgs`")
    stats = json.loads((root / "stats.json").read_text())
    splits = _check_dataset(root)
    groups = _jsonl(root / "train.jsonl.gz")
    negs = [len(g["negative_document_ids"]) for g in groups]
    with gzip.open(root / "corpus.jsonl.gz", "rt", encoding="utf-8") as fh:
        passages = sum(1 for _ in fh)
    assert stats["passages"] == passages
    assert stats["queries"] == {s: len(q) for s, q in splits.items()}
    assert stats["train_groups"] == len(groups)
    assert stats["negatives_per_group"] == {"min": min(negs), "max": max(negs)}
    readme = _readme_counts(root / "README.md")
    assert readme["passages"] == str(passages)
    for split, qids in splits.items():
        assert readme[f"queries ({split})"] == str(len(qids))
    assert readme["train groups"] == str(len(groups))
    assert readme == {k: str(v) for k, v in debian_pkgs.count_rows(stats)}
    if name == "data/debian-pkgs":
        assert stats["source_sha256"] in (root / "README.md").read_text()
        assert stats["queries"]["dev"] == stats["queries"]["test"] == 2000
        assert stats["source_packages"] == passages + sum(stats["dropped"].values())
    else:
        assert stats["queries"]["dev"] == stats["queries"]["test"] == 200


def test_committed_mini_bm25_reference_reproduces():
    root = REPO / "data" / "debian-pkgs-mini"
    stats = json.loads((root / "stats.json").read_text())
    assert common.bm25_reference(root) == stats["bm25"]["scores"]
    readme = (root / "README.md").read_text()
    for split, scores in stats["bm25"]["scores"].items():
        row = f"| {split} | " + " | ".join(f"{scores[m]:.4f}" for m in common.BM25_METRICS) + " |"
        assert row in readme
