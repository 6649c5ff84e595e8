"""StarbucksModel: every size equals a plain HF `output_hidden_states` computation; sides, one pass for
several sizes, early exit, similarity, sentence-transformers loading, clear refusals."""

import functools

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from retrieval import StarbucksModel
from retrieval.errors import StarbucksError
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder
from retrieval.sizes import Size

TEXTS = [
    "apt installs packages",
    "a",
    "the quick brown fox jumps over the lazy dog " * 3,
    "python3 library for parsing command line options",
    "font",
]
SIZES = [
    {"name": "small", "layers": 1, "dim": 8},
    {"name": "mid", "layers": 2, "dim": 16},
    "3x24",
    {"name": "full", "layers": 4, "dim": 32},
]
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


@functools.lru_cache(maxsize=4)
def plain_hf(path):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def reference(path, texts, layers, dim, pooling, normalize, max_length, prefix=""):
    """Plain transformers: hidden_states[layers], pooled, first `dim` dims, then L2 if normalised."""
    tok, model = plain_hf(path)
    batch = tok([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states[layers]
    if pooling == "cls":
        vec = states[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vec = (states * mask).sum(1) / mask.sum(1)
    vec = vec[:, :dim]
    return torch.nn.functional.normalize(vec, dim=-1).numpy() if normalize else vec.numpy()


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls-dot", "mean-cosine"])
def tiny(request, tmp_path_factory):
    pooling, normalize = request.param
    path = tmp_path_factory.mktemp(f"tiny-{pooling}") / "model"
    save_encoder(
        StarbucksEncoder(
            tiny_bert(layers=4, hidden=32, vocab=minilm_tokenizer().vocab_size, seed=3), pooling, normalize
        ),
        path,
        minilm_tokenizer(),
        {
            "sizes": SIZES,
            "query_max_length": 6,
            "passage_max_length": 12,
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
        },
    )
    return path, pooling, normalize


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """The shipped MiniLM after one optimiser step (mean pooling, cosine), saved through the toolkit."""
    from transformers import AutoModel

    from retrieval.config import DEFAULTS
    from retrieval.encoder import tokenize

    tok = minilm_tokenizer()
    encoder = StarbucksEncoder(AutoModel.from_pretrained(resolve_model_path(MINILM)), "mean", normalize=True)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    vecs = encoder.embed(tokenize(tok, TEXTS, 16), [Size("", 6, 384)])
    (-sum(v.sum() for v in vecs.values())).backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("minilm") / "model"
    save_encoder(
        encoder.eval(),
        path,
        tok,
        {
            "sizes": DEFAULTS["sizes"],
            "query_max_length": 16,
            "passage_max_length": 32,
            "method": "srl",
            "base_model": MINILM,
        },
    )
    return path


def test_every_size_equals_hidden_states_of_plain_transformers(tiny):
    path, pooling, normalize = tiny
    model = StarbucksModel.from_pretrained(path, "cpu")
    assert (model.pooling, model.normalize, model.sizes.names) == (pooling, normalize, ["small", "mid", "3x24", "full"])
    for size in model.sizes:
        want = reference(path, TEXTS, size.layers, size.dim, pooling, normalize, 12)
        got = model.encode(TEXTS, size.name, batch_size=2)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), size.dim)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    q = model.encode_queries(TEXTS, "mid")
    np.testing.assert_allclose(q, reference(path, TEXTS, 2, 16, pooling, normalize, 6, "query: "), atol=1e-5, rtol=0)
    p = model.encode_passages(TEXTS, "3x24")
    np.testing.assert_allclose(p, reference(path, TEXTS, 3, 24, pooling, normalize, 12, "passage: "), atol=1e-5, rtol=0)
    # any LxD that fits, on demand; default: the largest size
    np.testing.assert_allclose(
        model.encode(TEXTS, "2x5"), reference(path, TEXTS, 2, 5, pooling, normalize, 12), atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(model.encode(TEXTS), model.encode(TEXTS, "full"), atol=0, rtol=0)


def test_several_sizes_come_from_one_pass_that_stops_at_the_deepest(tiny):
    path, pooling, normalize = tiny
    model = StarbucksModel.from_pretrained(path, "cpu")
    ran = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, _o, n=n: ran.append(n))
        for n, layer in enumerate(model.encoder.layers, 1)
    ]
    try:
        both = model.encode(TEXTS, sizes=["small", "mid"], batch_size=len(TEXTS))
        assert ran == [1, 2]  # one batch, one pass, layers 3 and 4 never run
    finally:
        for h in hooks:
            h.remove()
    assert list(both) == ["small", "mid"]
    for name, vectors in both.items():
        np.testing.assert_allclose(vectors, model.encode(TEXTS, name), atol=1e-6, rtol=0)
    one = model.encode("apt installs packages", "mid")
    assert one.shape == (16,)
    np.testing.assert_allclose(one, both["mid"][0], atol=1e-6, rtol=0)


def test_similarity_is_the_models_own_score(tiny):
    path, _, normalize = tiny
    model = StarbucksModel.from_pretrained(path, "cpu")
    q, p = model.encode_queries(TEXTS[:2], "mid"), model.encode_passages(TEXTS, "mid")
    scores = model.similarity(q, p)
    assert scores.shape == (2, len(TEXTS))
    want = np.array([[float(np.dot(a, b)) for b in p] for a in q])
    if normalize:  # cosine, by hand
        want = np.array([[float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for b in p] for a in q])
    np.testing.assert_allclose(scores, want, atol=1e-5, rtol=0)
    assert model.similarity_fn_name == ("cosine" if normalize else "dot")
    with pytest.raises(StarbucksError, match="encode both at one size"):
        model.similarity(q, model.encode_passages(TEXTS, "small"))


def test_sentence_transformers_loads_a_checkpoint_and_gives_the_largest_size(tiny):
    st = pytest.importorskip("sentence_transformers")
    path, pooling, normalize = tiny
    model = StarbucksModel.from_pretrained(path, "cpu")
    loaded = st.SentenceTransformer(str(path), device="cpu")
    assert loaded.similarity_fn_name == model.similarity_fn_name and loaded.max_seq_length == 12
    assert loaded[0].auto_model.pooler is None  # none was saved: ST builds no random one
    np.testing.assert_allclose(loaded.encode(TEXTS, batch_size=2), model.encode(TEXTS, "full"), atol=1e-5, rtol=0)
    # each side its own prefix and max length (the third text is longer than both)
    np.testing.assert_allclose(loaded.encode_query(TEXTS), model.encode_queries(TEXTS, "full"), atol=1e-5, rtol=0)
    np.testing.assert_allclose(loaded.encode_document(TEXTS), model.encode_passages(TEXTS, "full"), atol=1e-5, rtol=0)


def test_minilm_fine_tuned_every_size_and_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = StarbucksModel.from_pretrained(minilm, "cpu")
    assert (model.pooling, model.normalize, len(model.sizes)) == ("mean", True, 6)
    got = model.encode(TEXTS, sizes=model.sizes.names)
    for size in model.sizes:
        want = reference(minilm, TEXTS, size.layers, size.dim, "mean", True, 32)
        np.testing.assert_allclose(got[size.name], want, atol=1e-5, rtol=0)
    original = StarbucksModel.from_pretrained(MINILM, "cpu", pooling="mean", normalize=True, passage_max_length=32)
    assert np.abs(original.encode(TEXTS) - got["trenta"]).max() > 1e-4  # the step changed the weights
    loaded = st.SentenceTransformer(str(minilm), device="cpu")
    np.testing.assert_allclose(loaded.encode(TEXTS), got["trenta"], atol=1e-5, rtol=0)


def test_a_plain_hf_model_needs_only_its_pooling(tmp_path):
    """The released ielabgroup/Starbucks-msmarco checkpoints: a plain BERT, CLS pooling, dot product."""
    path = tmp_path / "plain"
    tiny_bert(layers=4, hidden=32, vocab=minilm_tokenizer().vocab_size, seed=5).save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    with pytest.raises(StarbucksError, match="has no starbucks.json.*pooling='cls'"):
        StarbucksModel.from_pretrained(path)
    model = StarbucksModel.from_pretrained(path, "cpu", pooling="cls", normalize=False)
    assert [s.key for s in model.sizes] == ["4x32"]
    np.testing.assert_allclose(
        model.encode(TEXTS, "2x16"), reference(path, TEXTS, 2, 16, "cls", False, 196), atol=1e-5, rtol=0
    )
    named = StarbucksModel.from_pretrained(path, "cpu", pooling="cls", sizes=[{"name": "x", "layers": 2, "dim": 16}])
    np.testing.assert_allclose(named.encode(TEXTS, "x"), model.encode(TEXTS, "2x16"), atol=1e-6, rtol=0)
    # what a stage passes for a zero-shot model: its config's settings, given values still win
    staged = StarbucksModel.from_pretrained(
        path, "cpu", normalize=True, defaults={"pooling": "mean", "normalize": False, "sizes": ["3x8"]}
    )
    assert (staged.pooling, staged.normalize, [s.key for s in staged.sizes]) == ("mean", True, ["3x8"])


def test_bad_sizes_and_paths_are_one_clear_line(tiny, tmp_path):
    path, _, _ = tiny
    model = StarbucksModel.from_pretrained(path, "cpu")
    for bad, message in [
        ("venti", r"unknown size 'venti': use a configured name \(small, mid, 3x24, full\)"),
        ("5x8", "asks for 5 layers but .* has only 4"),
        ("2x64", "asks for 64 dims but .* has only 32"),
    ]:
        with pytest.raises(StarbucksError, match=message) as err:
            model.encode(TEXTS, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(StarbucksError, match="precision = 'fp8' is not one of auto, fp32, fp16, bf16"):
        StarbucksModel.from_pretrained(path, "cpu", precision="fp8")
    half = StarbucksModel.from_pretrained(path, "cpu", precision="bf16").encode(TEXTS, "mid")  # bf16 autocast
    assert 0 < np.abs(half - model.encode(TEXTS, "mid")).max() < 5e-2
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    long = StarbucksModel.from_pretrained(path, "cpu", passage_max_length=200)  # the tiny BERT has 128 positions
    with pytest.raises(
        StarbucksError,
        match="texts of 200 tokens but .* has 128 positions; set model.passage_max_length .* to at most 128",
    ):
        long.encode_passages(["word " * 300])
    assert long.encode_passages(TEXTS).shape[0] == len(TEXTS)  # short texts fit
    for bad, message in [
        (tmp_path / "empty", "is not a model directory \\(no config.json\\)"),
        (tmp_path / "file.txt", "is a file, not a model directory"),
        (tmp_path / "missing" / "model", "does not exist"),
    ]:
        with pytest.raises(StarbucksError, match=message) as err:
            StarbucksModel.from_pretrained(bad)
        assert "\n" not in str(err.value)


def test_the_readme_example_runs_as_written_on_a_demo_model(tmp_path, monkeypatch, capsys, repo_root):
    """README's Python example, run in a folder whose runs/demo/model is what `make demo` writes (the
    default sizes; a small random model with the shape their grande needs)."""
    import re

    from retrieval.config import DEFAULTS

    block = re.search(r"this runs as written\):\n\n```python\n(.*?)```", (repo_root / "README.md").read_text(), re.S)
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) == 5  # five statements
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=128, vocab=minilm_tokenizer().vocab_size), "mean", True),
        tmp_path / "runs" / "demo" / "model",
        minilm_tokenizer(),
        {"sizes": DEFAULTS["sizes"][:4]},
    )
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    scores = np.array([float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", capsys.readouterr().out)])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1 + 1e-5)  # cosine scores of one query, two passages


def test_a_hub_checkpoint_brings_its_starbucks_json(tmp_path, monkeypatch):
    import json

    import huggingface_hub

    from retrieval.model import checkpoint_meta

    assert checkpoint_meta("someone/not-cached") == {}  # offline (HF_HUB_OFFLINE=1) and not cached: a plain model
    (tmp_path / "starbucks.json").write_text(json.dumps({"pooling": "cls", "sizes": ["2x8"]}))
    asked = []
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo_id, filename: asked.append((repo_id, filename)) or str(tmp_path / filename),
    )
    assert checkpoint_meta("someone/model") == {"pooling": "cls", "sizes": ["2x8"]}
    assert asked == [("someone/model", "starbucks.json")]
