"""train.export --onnx: each size's ONNX graph, run by ONNX Runtime on the tokenizer and settings written
beside it, gives StarbucksModel's query and passage vectors (batches with padding, texts past the max
lengths, prefixes), for CLS + dot and mean + cosine checkpoints."""

import json

import numpy as np
import pytest

from conftest import tiny_bert
from retrieval import StarbucksModel
from retrieval.errors import StarbucksError
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder
from train.export import ONNX_FILE, ONNX_META, export, main as export_main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

SIZES = [
    {"name": "small", "layers": 1, "dim": 8},
    {"name": "mid", "layers": 2, "dim": 16},
    {"name": "full", "layers": 4, "dim": 32},
]
TEXTS = [
    "apt installs packages",
    "a",
    "the quick brown fox jumps over the lazy dog " * 4,
    "font editor for the desktop",
    "x y",
]


def save_tiny(path, pooling, normalize):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=3), pooling, normalize),
        path,
        tok,
        {
            "sizes": SIZES,
            "query_max_length": 8,
            "passage_max_length": 16,
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
        },
    )
    return path


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls-dot", "mean-cosine"])
def exported(request, tmp_path_factory):
    pooling, normalize = request.param
    root = tmp_path_factory.mktemp(f"onnx-{pooling}")
    model_dir = save_tiny(root / "model", pooling, normalize)
    export_main([str(model_dir), "--all", "--onnx", str(root / "onnx")])
    return model_dir, root / "onnx", pooling, normalize


def run_onnx(folder, texts, kind):
    """What a user of the export does: the written settings, the written tokenizer, ONNX Runtime."""
    from transformers import AutoTokenizer

    meta = json.loads((folder / ONNX_META).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(
        [meta[f"{kind}_prefix"] + t for t in texts],
        padding=True,
        truncation=True,
        max_length=meta[f"{kind}_max_length"],
        return_tensors="np",
        return_token_type_ids=False,
    )
    session = ort.InferenceSession(str(folder / meta["file"]), providers=["CPUExecutionProvider"])
    return session.run(
        ["embedding"],
        {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)},
    )[0]


def assert_vectors_near(got, want, rel=1e-4):
    """Each vector within `rel` of its own norm."""
    assert got.shape == want.shape
    err = np.linalg.norm(got - want, axis=1)
    assert np.all(err <= rel * np.linalg.norm(want, axis=1)), err / np.linalg.norm(want, axis=1)


def test_each_sizes_graph_gives_starbucks_models_vectors(exported):
    model_dir, out, pooling, normalize = exported
    model = StarbucksModel.from_pretrained(model_dir, "cpu", precision="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["full", "mid", "small"]
    for size in model.sizes:
        folder = out / size.name
        meta = json.loads((folder / ONNX_META).read_text())
        assert meta["size"] == size.to_dict() and (meta["pooling"], meta["normalize"]) == (pooling, normalize)
        assert (meta["query_max_length"], meta["passage_max_length"]) == (8, 16)
        assert (meta["query_prefix"], meta["passage_prefix"]) == ("query: ", "passage: ")
        assert (folder / "tokenizer.json").is_file() and (folder / ONNX_FILE).is_file()
        for kind, encode in (("query", model.encode_queries), ("passage", model.encode_passages)):
            want = encode(TEXTS, size.name)
            got = run_onnx(folder, TEXTS, kind)  # one batch: padded rows and rows cut at the max length
            assert got.shape == (len(TEXTS), size.dim)
            assert_vectors_near(got, want)
            assert_vectors_near(run_onnx(folder, TEXTS[:1], kind), want[:1])  # another batch size and length
        if normalize:
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_one_size_export_and_its_refusals(exported, tmp_path, capsys):
    model_dir, _, _, _ = exported
    export_main([str(model_dir), "--size", "2x16", "--onnx", str(tmp_path / "mid")])
    assert json.loads((tmp_path / "mid" / ONNX_META).read_text())["size"]["name"] == "mid"
    export_main([str(model_dir), "--size", "mid", "--onnx", str(tmp_path / "mid")])  # over its own export: fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StarbucksError, match="not an ONNX export"):
        export(str(model_dir), ["mid"], onnx=tmp_path / "other")
    with pytest.raises(StarbucksError, match="give --out DIR too"):
        export(str(model_dir), ["mid"], onnx=tmp_path / "x", push="user/name")
    with pytest.raises(StarbucksError, match="--onnx DIR"):
        export(str(model_dir), ["mid"])
