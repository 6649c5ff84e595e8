"""One query vector whichever way the model is loaded: sentence-transformers' `encode_query` /
`encode_document` of a checkpoint folder and of a single-size export are `StarbucksModel`'s
`encode_queries` / `encode_passages` (prefix and max length of each side), for queries longer than
the query max length and passages longer than the passage max length; the files written before
(one `max_seq_length` for every input) gave long queries another vector."""

import json

import pytest

from conftest import assert_near, tiny_bert
from retrieval import StarbucksModel
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder
from train.export import main as export_main

st = pytest.importorskip("sentence_transformers")

QUERY_MAX, PASSAGE_MAX = 6, 12
PREFIXES = {"query_prefix": "query: ", "passage_prefix": "passage: "}
SIZES = [
    {"name": "small", "layers": 1, "dim": 8},
    {"name": "mid", "layers": 2, "dim": 16},
    {"name": "full", "layers": 4, "dim": 32},
]
LONG_QUERIES = [
    "how do I install a python library for parsing command line options on debian",
    "font editor for opentype and truetype fonts with a graphical interface",
]
SHORT_QUERIES = ["font editor", "irc"]
QUERIES = LONG_QUERIES + SHORT_QUERIES
PASSAGES = [
    "the quick brown fox jumps over the lazy dog " * 3,
    "A PDF editor.",
    "python3 library for parsing command line options, with subcommands, help and completion",
]


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def near_rows(got, want, msg: str) -> None:
    """Every vector within 1e-5 of its own norm."""
    assert got.shape == want.shape, msg
    for i, (a, b) in enumerate(zip(got, want)):
        assert_near(a, b, rel=1e-5, msg=f"{msg} row {i}")


def relative_error(got, want) -> float:
    import numpy as np

    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls-dot", "mean-cosine"])
def checkpoint(request, tmp_path_factory):
    from transformers import AutoTokenizer

    pooling, normalize = request.param
    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    path = tmp_path_factory.mktemp(f"sides-{pooling}") / "model"
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=11), pooling, normalize),
        path,
        tok,
        {"sizes": SIZES, "query_max_length": QUERY_MAX, "passage_max_length": PASSAGE_MAX, **PREFIXES},
    )
    model = StarbucksModel.from_pretrained(path, "cpu")
    # the texts reach past each side's max length (prefix included), the short queries do not
    for q in LONG_QUERIES:
        assert tokens(tok, PREFIXES["query_prefix"] + q) > QUERY_MAX + 4
    for q in SHORT_QUERIES:
        assert tokens(tok, PREFIXES["query_prefix"] + q) <= QUERY_MAX
    assert tokens(tok, PREFIXES["passage_prefix"] + PASSAGES[0]) > PASSAGE_MAX + 4
    return path, model


def test_the_files_give_each_side_its_length_and_prefix(checkpoint):
    path, _ = checkpoint
    settings = json.loads((path / "sentence_bert_config.json").read_text())
    assert (settings["max_seq_length"], settings["query_length"], settings["document_length"]) == (
        PASSAGE_MAX,
        QUERY_MAX,
        PASSAGE_MAX,
    )
    prompts = json.loads((path / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "document": "passage: "}
    loaded = st.SentenceTransformer(str(path), device="cpu")
    assert loaded.max_seq_length == PASSAGE_MAX  # plain encode(): the passage length
    assert (loaded[0].query_length, loaded[0].document_length) == (QUERY_MAX, PASSAGE_MAX)


def test_a_checkpoint_in_sentence_transformers_gives_the_toolkits_query_and_passage_vectors(checkpoint):
    path, model = checkpoint
    loaded = st.SentenceTransformer(str(path), device="cpu")
    near_rows(loaded.encode_query(QUERIES, batch_size=3), model.encode_queries(QUERIES, "full"), "encode_query")
    near_rows(
        loaded.encode_document(PASSAGES, batch_size=2), model.encode_passages(PASSAGES, "full"), "encode_document"
    )
    near_rows(loaded.encode(PASSAGES), model.encode(PASSAGES, "full"), "encode")  # no prefix, passage length
    # one query alone (no padding beside it) is the same vector
    near_rows(loaded.encode_query(LONG_QUERIES[:1]), model.encode_queries(LONG_QUERIES[:1], "full"), "one query")


@pytest.mark.parametrize("size", ["small", "mid", "full"])
def test_a_single_size_export_gives_that_sizes_query_and_passage_vectors(checkpoint, tmp_path, size):
    path, model = checkpoint
    out = tmp_path / size
    export_main([str(path), "--size", size, "--out", str(out)])
    loaded = st.SentenceTransformer(str(out), device="cpu")
    near_rows(loaded.encode_query(QUERIES), model.encode_queries(QUERIES, size), f"{size} encode_query")
    near_rows(loaded.encode_document(PASSAGES), model.encode_passages(PASSAGES, size), f"{size} encode_document")
    near_rows(loaded.encode(PASSAGES), model.encode(PASSAGES, size), f"{size} encode")


def test_the_old_files_gave_long_queries_another_vector(checkpoint, tmp_path):
    """Without the per-side lengths (the files written before), ST cut queries at the passage length: the
    short queries agree, every long one differs."""
    import shutil

    path, model = checkpoint
    old = tmp_path / "old"
    shutil.copytree(path, old)
    settings = json.loads((old / "sentence_bert_config.json").read_text())
    del settings["query_length"], settings["document_length"]
    (old / "sentence_bert_config.json").write_text(json.dumps(settings))
    loaded = st.SentenceTransformer(str(old), device="cpu")
    got, want = loaded.encode_query(QUERIES), model.encode_queries(QUERIES, "full")
    near_rows(got[len(LONG_QUERIES) :], want[len(LONG_QUERIES) :], "short queries")
    for i in range(len(LONG_QUERIES)):
        assert relative_error(got[i], want[i]) > 1e-3, f"long query {i} gave the toolkit's vector with the old files"


def test_the_cards_sentence_transformers_example_runs_and_gives_the_toolkits_vectors(checkpoint):
    import re

    from retrieval.card import render_card
    from retrieval.checkpoint import model_shape, read_meta

    path, model = checkpoint
    card = render_card(path, read_meta(path), model_id=str(path), shape=model_shape(str(path)))
    code = re.search(r"With sentence-transformers.*?```python\n(.*?)```", card, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    near_rows(scope["q"], model.encode_queries(["how do I edit a PDF"], "full"), "card query")
    near_rows(scope["p"], model.encode_passages(["A PDF editor.", "An IRC client."], "full"), "card passages")
