"""The python-docs builder on a small synthetic source tree, and the shipped collection."""

import json
from pathlib import Path

import pytest

from conftest import REPO
from corpora.common import bm25_reference, bm25_table
from corpora.python_docs import main, split_docstring
from retrieval.data import load_corpus, load_split

SHIPPED = REPO / "data" / "python-docs"
LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"


def body(tag: str) -> str:
    return f"{tag} {LONG}."


TREE = {
    "alpha.py": f'''
def parse(path):
    """Parse a configuration
    file into sections.

    {body("Parse")}
    Continued on a second line.

    Returns a dict.
    """
    def inner():
        """A nested function is no object of the module.

        {body("inner")}
        """


class Reader:
    """Read records from a stream.

    {body("Reader")}
    """

    def read(self, n):
        """Read n records from the stream.

        {body("read")}
        """

    def _private(self):
        """Private methods are skipped entirely.

        {body("private")}
        """


def short():
    """A short body is dropped.

    Too short.
    """


def dup_b():
    """The second copy of a body.

    {body("Shared").upper()}
    """


def dup_a():
    """The first copy of a body.

    {body("shared")}
    """


def twice():
    """The first definition is replaced.

    {body("first")}
    """


def twice():
    """The second definition is the one bound.

    {body("second")}
    """


if True:
    def conditional():
        """Definitions inside statements are not read.

        {body("conditional")}
        """
''',
    "beta/__init__.py": f'''
def fetch():
    """Fetch it.

    {body("fetch")}
    """
''',
    "beta/gamma.py": f'''
def one():
    """Return the value of the thing.

    {body("one")}
    """


def two():
    """return the  value of the thing.

    {body("two")}
    """
''',
    "boom.py": f'''
raise SystemExit("this module was imported")


def launch():
    """Launch the rocket right now.

    {body("launch")}
    """
''',
    "latin.py": b'# -*- coding: latin-1 -*-\ndef describe():\n    """Describe the caf\xe9 menu here.\n\n    '
    + body("menu").encode()
    + b'\n    """\n',
    "bad.py": 'print "python 2"\n',
    "_private.py": f'def hidden():\n    """Hidden module function here.\n\n    {body("hidden")}\n    """\n',
    "test/test_alpha.py": f'def test_it():\n    """Tests are no API docs.\n\n    {body("test")}\n    """\n',
    "site-packages/thirdparty.py": f'def other():\n    """Third-party code here.\n\n    {body("other")}\n    """\n',
    "config-3.11-x86_64-linux-gnu/python-config.py": f'def cfg():\n    """Not a module name.\n\n    {body("x")}\n    """\n',
}
QUERIES = {
    "alpha.parse",
    "alpha.Reader",
    "alpha.Reader.read",
    "alpha.dup_a",
    "alpha.twice",
    "boom.launch",
    "latin.describe",
}
DISTRACTORS = {"beta.fetch", "beta.gamma.one", "beta.gamma.two"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stdlib")
    for name, text in TREE.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def build(tree: Path, out: Path) -> dict:
    main(["--source", str(tree), "--out", str(out), "--date", "2026-12-01", "--no-progress"])
    return json.loads((out / "stats.json").read_text())


def test_builder_rules_on_a_synthetic_tree(tree, tmp_path):
    stats = build(tree, tmp_path / "a")
    split = load_split("test", str(tmp_path / "a"))
    corpus = load_corpus(str(tmp_path / "a"))
    assert set(split.queries) == QUERIES
    assert set(corpus) == QUERIES | DISTRACTORS
    for qid, rel in split.qrels.items():
        assert rel == {qid: 1}  # exactly one relevant passage, its own, in the corpus
    assert split.queries["alpha.parse"] == "Parse a configuration file into sections."
    assert corpus["alpha.parse"] == f"{body('Parse')} Continued on a second line.\nReturns a dict."
    assert split.queries["latin.describe"] == "Describe the café menu here."
    assert corpus["alpha.twice"] == body("second")
    assert (stats["files_parsed"], stats["files_skipped"], stats["files_unparsable"]) == (5, 3, 1)
    # documented: parse, Reader, read, short, dup_b, dup_a, twice | fetch | one, two | launch | describe
    assert stats["documented"] == 12
    assert stats["dropped"] == {"short_passage": 1, "duplicate_passage": 1, "short_summary": 1, "duplicate_summary": 2}
    assert (stats["passages"], stats["queries"], stats["distractors"]) == (10, {"test": 7}, 3)
    assert sorted(p.name for p in (tmp_path / "a" / "qrels").iterdir()) == ["test.tsv"]
    assert not (tmp_path / "a" / "train.jsonl.gz").exists()


def snapshot(out: Path) -> dict:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_rebuild_is_byte_identical(tree, tmp_path):
    build(tree, tmp_path / "a")
    first = snapshot(tmp_path / "a")
    assert len(first) == 5  # README, stats, corpus, queries, qrels/test.tsv
    build(tree, tmp_path / "a")
    assert snapshot(tmp_path / "a") == first
    build(tree, tmp_path / "b")  # elsewhere: the data files are the same (the README names its --out)
    second = snapshot(tmp_path / "b")
    assert {f: b for f, b in second.items() if f.name != "README.md"} == {
        f: b for f, b in first.items() if f.name != "README.md"
    }


def test_split_docstring():
    assert split_docstring("One line.") == ("One line.", "")
    assert split_docstring("Sum\nmary.\n\n\nFirst  para\ngraph.\n\nSecond.") == (
        "Sum mary.",
        "First para graph.\nSecond.",
    )


@pytest.mark.skipif(not SHIPPED.is_dir(), reason="data/python-docs not built")
def test_shipped_collection_and_its_readme_numbers():
    stats = json.loads((SHIPPED / "stats.json").read_text())
    split = load_split("test", str(SHIPPED))
    corpus = load_corpus(str(SHIPPED))
    assert len(split.queries) == stats["queries"]["test"] and len(corpus) == stats["passages"]
    assert all(len(rel) == 1 and next(iter(rel)) in corpus for rel in split.qrels.values())
    assert sorted(p.name for p in (SHIPPED / "qrels").iterdir()) == ["test.tsv"]
    assert bm25_reference(SHIPPED, splits=["test"]) == stats["bm25"]["scores"]
    readme = (SHIPPED / "README.md").read_text()
    assert bm25_table(stats["bm25"]["scores"]) in readme
    assert f"| queries (test) | {stats['queries']['test']} |" in readme
    assert f"| passages | {stats['passages']} |" in readme
    assert f"CPython {stats['python_version']}" in readme
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in (SHIPPED / "LICENSE.txt").read_text()
