"""The paper's v3 variants as this toolkit reads them: the 1D Starbucks methods (`srl-depth`, `srl-width`)
visit exactly their sizes; a hybrid size (`3x384+6x64`, weighted, parts from two models) scores as the
weighted sum of its parts, comes from one pass of one model, and flows through encode, search, eval and
the size chooser like any size."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import yaml

from conftest import mini_slice, tiny_bert
from retrieval import StarbucksModel
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.config import load_config
from retrieval.encoder import StarbucksEncoder
from retrieval.errors import StarbucksError
from retrieval.sizes import Part, Size, SizeList, hybrid_size, parse_size, recorded_size

TEXTS = [
    "apt installs packages",
    "a",
    "the quick brown fox jumps over the lazy dog " * 3,
    "python3 library for parsing command line options",
    "font",
]
SIZES = ["1x8", "2x16", "4x32"]


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))


def save_tiny(path, seed, pooling="cls", normalize=False, sizes=SIZES, **meta):
    tok = tokenizer()
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=seed), pooling, normalize),
        path,
        tok,
        {"sizes": sizes, "query_max_length": 8, "passage_max_length": 24, **meta},
    )
    return path


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls-dot", "mean-cosine"])
def two_models(request, tmp_path_factory):
    """Two tiny models of other weights (the second with other prefixes and lengths), same pooling."""
    pooling, normalize = request.param
    root = tmp_path_factory.mktemp(f"hybrid-{pooling}")
    a = save_tiny(root / "depth", 3, pooling, normalize, query_prefix="query: ")
    b = save_tiny(
        root / "width", 4, pooling, normalize, query_max_length=6, passage_max_length=16, passage_prefix="passage: "
    )
    return a, b


# ---------------------------------------------------------------- the spec


def test_hybrid_spec_keys_weights_and_refusals():
    known = SizeList.from_config(
        [{"name": "demi", "layers": 1, "dim": 32}, "3x384", {"name": "trenta", "layers": 6, "dim": 384}]
    )
    h = parse_size(" 3x384 + 0.5 * 6x64 @ width ", known)
    assert (h.key, h.name, h.layers, h.dim, h.models) == (
        "3x384+0.5*6x64@width",
        "3x384+0.5*6x64@width",
        6,
        448,
        ["width"],
    )
    assert h.parts == (Part(Size("", 3, 384)), Part(Size("", 6, 64), 0.5, "width"))
    assert h.ident == (6, 448, "3x384+0.5*6x64@width") and Size("", 6, 448).ident == (6, 448)
    named = parse_size("demi+1.0*trenta", known)  # a configured name as a part; a weight of 1 is not written
    assert named.key == "1x32+6x384" and named.parts[1].size.name == "trenta"
    assert parse_size(".25*1x8+2x16").parts[0].weight == 0.25
    assert hybrid_size([Part(Size("", 1, 8), 2.0), Part(Size("", 2, 16))]).key == "2*1x8+2x16"
    assert recorded_size("3x384+0.5*6x64@width", 6, 448) == h  # what a store, run or eval file gives back
    assert recorded_size("grande", 4, 128) == Size("grande", 4, 128)
    assert SizeList.from_config([h.to_dict()])[0] == h
    for spec, message in [
        ("3x384+3x384", "given twice"),
        ("0*3x384+6x64", "weights must be > 0"),
        ("3x384@width", "has one part"),
        ("demi@w+6x64", "give its size as LxD"),
        ("3x384+", "is not \\[WEIGHT\\*\\]SIZE"),
        ("2*0.5*3x384+6x64", "is not"),
    ]:
        with pytest.raises(StarbucksError, match=message):
            parse_size(spec, known)
    with pytest.raises(StarbucksError, match="recorded with 6x400"):
        recorded_size("3x384+6x64", 6, 400)
    with pytest.raises(StarbucksError, match="holds the hybrid 3x384\\+6x64"):
        load_config(None, ["sizes=[1x8,3x384+6x64]"])


# ---------------------------------------------------------------- 1D Starbucks methods


def test_depth_and_width_methods_visit_exactly_their_sizes():
    from train.methods import plan_method

    sizes = SizeList.from_config(
        ["1x8", {"name": "mid", "layers": 2, "dim": 16}, {"name": "full", "layers": 4, "dim": 32}]
    )
    depth = plan_method(load_config(None, ["train.method=srl-depth"]).train, sizes, 4, 32, seed=0)
    width = plan_method(load_config(None, ["train.method=srl-width"]).train, sizes, 4, 32, seed=0)
    # by hand: depth = every layer count of the list at the full width; width = every dim at the full depth
    assert [(s.name, s.layers, s.dim) for s in depth.schedule.at(0)] == [
        ("1x32", 1, 32),
        ("2x32", 2, 32),
        ("full", 4, 32),
    ]
    assert [(s.name, s.layers, s.dim) for s in width.schedule.at(5)] == [
        ("4x8", 4, 8),
        ("4x16", 4, 16),
        ("full", 4, 32),
    ]
    for plan in (depth, width):
        assert plan.reduction == "mean" and list(plan.saved_sizes) == plan.schedule.at(3)
    weighted = load_config(None, ["train.method=srl-depth", "train.size_weights=[1,2,3]"]).train
    assert plan_method(weighted, sizes, 4, 32, seed=0).name == "srl-depth"
    assert (
        plan_method(
            load_config(None, ["train.method=srl-width"]).train, SizeList.from_config(["1x8", "2x16"]), 4, 32, seed=0
        ).truncate_to
        == 2
    )  # layers above the list's deepest are never trained


def test_a_depth_wise_run_trains_and_records_its_sizes(tmp_path, monkeypatch):
    """One training step of srl-depth and one of srl-width on a tiny model: the loss visits exactly the
    1D sizes (its InfoNCE and KL terms name them), and the model's starbucks.json lists them."""
    from retrieval.losses import StarbucksLoss
    from train.finetune import run_training

    data = tmp_path / "col"
    data.mkdir()
    docs = {f"d{i}": f"passage number {i} about topic {i % 7} and thing {i % 5}" for i in range(30)}
    (data / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in docs.items()))
    (data / "train.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "query_id": f"q{g}",
                    "query": f"topic {g % 7}",
                    "positive_document_ids": [f"d{g}"],
                    "negative_document_ids": [f"d{(g + k) % 30}" for k in (1, 2, 3)],
                }
            )
            + "\n"
            for g in range(12)
        )
    )
    backbone = tmp_path / "backbone"
    tiny_bert(layers=4, hidden=32, vocab=tokenizer().vocab_size, seed=0).save_pretrained(backbone)
    tokenizer().save_pretrained(backbone)
    visited = []
    forward = StarbucksLoss.forward

    def spy(self, q, p, sizes=None):
        visited.append([s.key for s in (self.sizes if sizes is None else sizes)])
        return forward(self, q, p, sizes)

    monkeypatch.setattr(StarbucksLoss, "forward", spy)
    expected = {"srl-depth": ["1x32", "2x32", "4x32"], "srl-width": ["4x8", "4x16", "4x32"]}
    for method, keys in expected.items():
        visited.clear()
        config = tmp_path / f"{method}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "name": method,
                    "output_dir": str(tmp_path / method),
                    "model": {
                        "name_or_path": str(backbone),
                        "pooling": "cls",
                        "normalize": False,
                        "query_max_length": 16,
                        "passage_max_length": 24,
                    },
                    "sizes": SIZES,
                    "data": {"corpus": str(data), "train": str(data / "train.jsonl")},
                    "train": {
                        "method": method,
                        "batch_size": 4,
                        "group_size": 3,
                        "max_steps": 1,
                        "logging_steps": 1,
                        "learning_rate": 1e-3,
                    },
                }
            )
        )
        run_training(load_config(config))
        assert visited and all(v == keys for v in visited), visited
        log = json.loads((tmp_path / method / "train_log.jsonl").read_text().splitlines()[0])
        assert sorted(k[3:] for k in log if k.startswith("ce/")) == sorted(keys)
        assert sorted(k[3:] for k in log if k.startswith("kl/")) == sorted(keys[:-1])  # (N, D) is the teacher
        meta = json.loads((tmp_path / method / "model" / "starbucks.json").read_text())
        assert meta["method"] == method and [s["name"] for s in meta["sizes"]] == keys
        assert StarbucksModel.from_pretrained(tmp_path / method / "model", "cpu").sizes.names == keys


# ---------------------------------------------------------------- one model, one pass


def test_one_model_hybrid_is_one_pass_and_equals_its_parts_encoded_separately(two_models):
    path, _ = two_models
    model = StarbucksModel.from_pretrained(path, "cpu")
    ran = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, _o, n=n: ran.append(n))
        for n, layer in enumerate(model.encoder.layers, 1)
    ]
    try:
        both = model.encode_passages(TEXTS, sizes=["1x8+2x16", "0.5*1x8+3*2x16", "2x16"], batch_size=len(TEXTS))
        assert ran == [1, 2]  # one batch, one pass to the deepest part: layers 3 and 4 never run
    finally:
        for h in hooks:
            h.remove()
    one, two = model.encode_passages(TEXTS, "1x8"), model.encode_passages(TEXTS, "2x16")
    np.testing.assert_allclose(both["1x8+2x16"], np.concatenate([one, two], axis=1), rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        both["0.5*1x8+3*2x16"], np.concatenate([one * 0.5**0.5, two * 3**0.5], axis=1), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(both["2x16"], two, rtol=0, atol=1e-6)
    assert model.size("1x8+2x16").dim == 24 and model.encode("a", "1x8+2x16").shape == (24,)
    from retrieval.st_loss import as_sizes
    from train.export import export_size

    with pytest.raises(StarbucksError, match="1x8\\+2x16 is a hybrid of 2 sizes"):
        export_size(model, "1x8+2x16", path.parent / "export")
    with pytest.raises(StarbucksError, match="is a hybrid size: a model is trained at plain sizes"):
        as_sizes(["1x8", "1x8+2x16"])


def test_hybrid_scores_are_the_weighted_sum_of_the_parts_scores(two_models):
    """The score of a hybrid, one inner product over the concatenation, equals the weighted sum of each
    part's score computed on its own (each part by its own model, with its own prefixes, lengths and
    normalisation), for one-model and two-model hybrids."""
    a_path, b_path = two_models
    model = StarbucksModel.from_pretrained(a_path, "cpu", part_models={"width": b_path})
    other = StarbucksModel.from_pretrained(b_path, "cpu")
    queries, passages = TEXTS[:3], TEXTS

    def part_scores(m, size):
        return m.similarity(m.encode_queries(queries, size), m.encode_passages(passages, size))

    cases = {
        "1x8+4x32": part_scores(model, "1x8") + part_scores(model, "4x32"),
        "0.25*1x8+4x32": 0.25 * part_scores(model, "1x8") + part_scores(model, "4x32"),
        "2x16+1.5*4x8@width": part_scores(model, "2x16") + 1.5 * part_scores(other, "4x8"),
        "0.5*2x16@width+3x32": 0.5 * part_scores(other, "2x16") + part_scores(model, "3x32"),
    }
    for spec, expected in cases.items():
        q, p = model.encode_queries(queries, spec), model.encode_passages(passages, spec)
        assert q.shape[1] == model.size(spec).dim
        np.testing.assert_allclose(model.similarity(q, p), expected, rtol=0, atol=2e-5, err_msg=spec)
    # the second model's part used its own prefix and length (not the first model's)
    np.testing.assert_allclose(
        model.encode_queries(queries, "1x8+4x8@width")[:, 8:], other.encode_queries(queries, "4x8"), rtol=0, atol=1e-6
    )
    assert other.query_prefix == "" and model.query_prefix == "query: "


def test_two_model_parts_run_at_the_same_time_and_refusals(two_models):
    """With `parallel_parts` the other model encodes in a thread of its own while this one encodes (without,
    after it, in this thread; `auto`: on a GPU only), the same vectors either way; a label no model has, or a
    part that does not fit its model, is one line."""
    a_path, b_path = two_models
    model = StarbucksModel.from_pretrained(a_path, "cpu", part_models={"w": b_path}, parallel_parts=True)
    threads = {}
    for label, m in (("self", model), ("w", model.part_models["w"])):
        m.encoder.layers[0].register_forward_hook(
            lambda *_, label=label: threads.setdefault(label, threading.current_thread().name) and None
        )
    together = model.encode(TEXTS, "1x8+1x8@w")
    assert threads["self"] == threading.main_thread().name and threads["w"].startswith("part-model")
    threads.clear()
    model.parallel_parts = False
    np.testing.assert_array_equal(model.encode(TEXTS, "1x8+1x8@w"), together)
    assert threads["w"] == threading.main_thread().name
    model.parallel_parts = "auto"
    assert model.parallel is False  # on the CPU
    assert load_config(None, ["encode.parallel_parts=true"]).encode.parallel_parts is True
    with pytest.raises(StarbucksError, match="encode.parallel_parts = 'sometimes' must be true or false"):
        load_config(None, ["encode.parallel_parts=sometimes"])
    with pytest.raises(StarbucksError, match="takes a part from model 'x'.*encode.part_models.x=PATH"):
        model.encode(TEXTS, "1x8+1x8@x")
    with pytest.raises(StarbucksError, match="asks for 64 dims"):
        model.size("1x8+4x64@w")
    with pytest.raises(StarbucksError, match="asks for 5 layers"):
        model.size("5x8+1x8@w")
    # a hybrid's identity covers both models: another second model is another store
    other = StarbucksModel.from_pretrained(a_path, "cpu", part_models={"w": a_path})
    size = model.size("1x8+1x8@w")
    assert model.identity(size, "passage")["model_sha256"] != other.identity(size, "passage")["model_sha256"]
    assert model.identity(model.size("1x8+2x16"), "passage")["model_sha256"] == model.fingerprint


# ---------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A one-model and a two-model hybrid (and a plain size) encoded, searched and evaluated by the stages."""
    from encode.pipeline import encode_collection
    from eval.pipeline import evaluate_experiment
    from search.pipeline import search_collection

    root = tmp_path_factory.mktemp("hybrid-stages")
    col, _, _ = mini_slice(root / "col", queries=12, passages=120)
    a = save_tiny(root / "depth", 3, "cls", False, query_prefix="query: ")
    b = save_tiny(root / "width", 4, "cls", False, passage_max_length=16)
    (root / "exp.yaml").write_text(f"""
name: hybrid
output_dir: {root / "run"}
sizes: {json.dumps(SIZES)}
data: {{corpus: {col}, eval_splits: {{dev: {col}}}}}
encode: {{model: {a}, part_models: {{width: {b}}}, batch_size: 16, shard_rows: 50,
          sizes: "2x16, 0.5*1x8+4x16, 4x32+2*1x16@width"}}
search: {{depth: 10}}
eval: {{metrics: [nDCG@10, RR@10], plot: false}}
""")
    cfg = load_config(root / "exp.yaml")
    encode_collection(cfg, progress=False)
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)
    return root, cfg, a, b, col


def test_a_two_model_hybrid_encodes_and_searches(staged):
    """The stages' runs of the hybrids hold, for each query, the weighted sum of the parts' scores (each part
    encoded by its own model through StarbucksModel, in float16 as the store keeps them) in rank order."""
    from retrieval.data import iter_corpus, load_split
    from retrieval.runfile import find_runs, read_run
    from retrieval.store import EmbeddingStore

    root, cfg, a, b, col = staged
    runs = {size.name: (size, path) for size, path in find_runs(root / "run" / "runs", "dev")}
    assert set(runs) == {"2x16", "0.5*1x8+4x16", "4x32+2*1x16@width"}
    assert runs["4x32+2*1x16@width"][0].parts[1] == Part(Size("", 1, 16), 2.0, "width")
    store = EmbeddingStore(root / "run" / "embeddings" / "4x32+2*1x16@width")
    meta = store.read_meta()
    assert (meta["layers"], meta["dim"], meta["part_models"]) == (4, 48, {"width": str(b)})
    assert store.size == runs["4x32+2*1x16@width"][0]

    first, second = StarbucksModel.from_pretrained(a, "cpu"), StarbucksModel.from_pretrained(b, "cpu")
    split = load_split("dev", str(col))
    qids = list(split.queries)
    ids, texts = zip(*iter_corpus(str(col)))

    def scores(m, size):
        q = m.encode_queries([split.queries[x] for x in qids], size).astype(np.float16).astype(np.float32)
        p = m.encode_passages(list(texts), size).astype(np.float16).astype(np.float32)
        return q @ p.T

    expected = {
        "0.5*1x8+4x16": 0.5 * scores(first, "1x8") + scores(first, "4x16"),
        "4x32+2*1x16@width": scores(first, "4x32") + 2 * scores(second, "1x16"),
    }
    for name, want in expected.items():
        run = read_run(runs[name][1])
        assert set(run) == set(qids)
        tolerance = 2e-3 * float(np.abs(want).max())  # float16 vectors: a small tolerance
        for i, q in enumerate(qids):
            ranked = sorted(run[q].items(), key=lambda x: -x[1])
            assert len(ranked) == 10
            for doc, score in ranked:  # every listed score is the weighted sum
                assert score == pytest.approx(want[i, ids.index(doc)], abs=tolerance), (name, q, doc)
            assert ranked[0][1] == pytest.approx(want[i].max(), abs=tolerance)  # and the best passage is first
    summary = json.loads((root / "run" / "eval" / "dev.json").read_text())
    assert [s["size"] for s in summary["sizes"]] == ["2x16", "0.5*1x8+4x16", "4x32+2*1x16@width"]


def test_search_and_eval_take_a_hybrid_by_its_spec_and_a_missing_label_is_one_line(staged, capsys):
    from encode.__main__ import main as encode_main
    from eval.pipeline import evaluate_experiment
    from search.pipeline import search_collection

    root, cfg, _, _, _ = staged
    picked = load_config(
        root / "exp.yaml",
        ["search.sizes=0.5 * 1x8 + 4x16", "eval.sizes=0.5*1x8+4x16", f"paths.eval={root / 'eval-picked'}"],
    )
    assert [p.name for p in search_collection(picked, progress=False)] == []  # up to date: nothing searched
    assert [r.size.name for r in evaluate_experiment(picked)["dev"]] == ["0.5*1x8+4x16"]
    with pytest.raises(SystemExit) as exit_info:
        encode_main(["--config", str(root / "exp.yaml"), "encode.sizes=1x8+2x16@other"])
    assert exit_info.value.code == 2
    assert "takes a part from model 'other'" in capsys.readouterr().err


def test_the_size_chooser_measures_a_two_model_hybrid(staged):
    from eval.sizes import measure_run

    root, _, _, _, col = staged
    _, _, costs = measure_run(root / "run", "dev", queries=str(col), passages=8, query_sample=2, device="cpu")
    by_name = {c.size.name: c for c in costs}
    assert set(by_name) == {"2x16", "0.5*1x8+4x16", "4x32+2*1x16@width"}
    assert by_name["4x32+2*1x16@width"].size.dim == 48
    assert by_name["4x32+2*1x16@width"].bytes_per_passage > 2 * 48  # float16 vectors of 48 dims (+ the .npy header)
    assert by_name["2x16"].bytes_per_passage < by_name["0.5*1x8+4x16"].bytes_per_passage
