"""eval.mteb_task: MTEB at any size, offline. A local task over a BEIR folder gives the suite's nDCG@10 for the same
model and size (through `SizeEncoder` and through an exported size loaded as a sentence-transformers model);
every size and export has an MTEB name and revision of its own, so MTEB's result cache keeps them apart."""

import pytest

from conftest import REPO, beir_slice
from retrieval.card import size_model_name
from retrieval.errors import StarbucksError
from retrieval.sizes import Size

mteb = pytest.importorskip("mteb")
pytest.importorskip("sentence_transformers")

SIZES = [{"name": "short", "layers": 1, "dim": 64}, {"name": "tall", "layers": 2, "dim": 384}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """all-MiniLM-L6-v2 (mean pooling, cosine; real vectors, so that no ranking hangs on the suite's fp16
    rounding) saved as a checkpoint with two sizes, each size exported; a python-docs slice; the suite."""
    from eval.suite import parse_collection, parse_model, run_suite
    from retrieval.model import StarbucksModel
    from train.export import export

    root = tmp_path_factory.mktemp("mteb")
    col = beir_slice(REPO / "data" / "python-docs", root / "docs", "test", 80, 120, skip=100)
    minilm = StarbucksModel.from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2",
        "cpu",
        pooling="mean",
        normalize=True,
        sizes=SIZES,
        query_max_length=24,
        passage_max_length=48,
    )
    checkpoint = root / "minilm" / "model"
    minilm.save(checkpoint, {"config": {"name": "minilm"}})
    export(str(checkpoint), ["all"], root / "st")
    sizes = [s["name"] for s in SIZES]
    report = run_suite([parse_model(f"minilm={checkpoint}")], [parse_collection(f"docs={col}")], root / "suite", sizes=sizes, device="cpu")  # fmt: skip
    return root, col, checkpoint, report["tables"]["minilm"]["nDCG@10"]["docs"]


def evaluate(model, col, cache=None) -> float:
    from eval.mteb_task import local_task

    result = mteb.evaluate(model, [local_task(f"docs={col}")], cache=cache, show_progress_bar=False)
    (task,) = result.task_results
    return task.get_score()


def fp32_ndcg(model, size, col) -> float:
    """nDCG@10 of the exact ranking over float32 vectors (the suite searches its float16 stores)."""
    import numpy as np

    from retrieval.data import iter_corpus, load_split
    from retrieval.metrics import evaluate as toolkit_evaluate

    ids, texts = zip(*iter_corpus(str(col)))
    split = load_split("test", str(col))
    scores = model.encode_queries(list(split.queries.values()), size) @ model.encode_passages(list(texts), size).T
    run = {q: {ids[j]: float(row[j]) for j in np.argsort(-row)[:100]} for q, row in zip(split.queries, scores)}
    return toolkit_evaluate(run, split.qrels, ["nDCG@10"]).aggregate["nDCG@10"]


def test_the_local_task_gives_the_suites_ndcg_at_every_size(setup):
    """The same model and size: MTEB's nDCG@10 (its own search and scoring, rounded to 5 decimals) is the
    suite's, through the checkpoint at a size and through that size's export in sentence-transformers; and
    that of the toolkit's ranking over float32 vectors (what is left against the suite is its fp16 store)."""
    from eval.mteb_task import SizeEncoder, load_sentence_transformer
    from retrieval.model import StarbucksModel

    root, col, checkpoint, suite = setup
    model = StarbucksModel.from_pretrained(str(checkpoint), "cpu")
    for size in suite:
        ours = evaluate(SizeEncoder(model, size), col)
        assert ours == pytest.approx(suite[size], abs=1e-3)
        assert ours == pytest.approx(fp32_ndcg(model, size, col), abs=1e-4)
        assert evaluate(load_sentence_transformer(root / "st" / size), col) == pytest.approx(ours, abs=1e-4)
    assert suite["short"] != pytest.approx(suite["tall"], abs=1e-2)  # the sizes are told apart below


def test_each_size_and_export_has_its_own_mteb_name_and_cache_entry(setup, tmp_path):
    """An export names its model and size in its sentence-transformers model card data (what MTEB files
    results under) and the weights in its revision; the checkpoint at that size gets the same name and
    revision. With one cache, the second size is evaluated, not handed the first size's scores."""
    from mteb.cache import ResultCache
    from mteb.models import ModelMeta

    from eval.mteb_task import SizeEncoder, load_sentence_transformer
    from retrieval.model import StarbucksModel

    root, col, checkpoint, suite = setup
    model = StarbucksModel.from_pretrained(str(checkpoint), "cpu")
    metas = {}
    for size in suite:
        st = load_sentence_transformer(root / "st" / size)
        assert st.model_card_data.model_name == f"local/minilm-{size}"
        metas[size] = ModelMeta.from_sentence_transformer_model(st)
        ours = SizeEncoder(model, size).mteb_model_meta
        assert (metas[size].name, metas[size].revision) == (ours.name, ours.revision)
    assert metas["short"].name != metas["tall"].name
    assert metas["short"].revision != metas["tall"].revision  # 1 layer vs 2 layers of weights
    assert load_sentence_transformer(checkpoint).model_card_data.model_name == "local/minilm-6x384"  # ST's size

    cache = ResultCache(cache_path=tmp_path / "cache")
    scores = {size: evaluate(load_sentence_transformer(root / "st" / size), col, cache) for size in suite}
    assert scores == pytest.approx(suite, abs=1e-3)
    results = tmp_path / "cache" / "results"
    assert {p.relative_to(results).as_posix() for p in results.rglob("docs.json")} == {
        f"local__minilm-{size}/{metas[size].revision}/docs.json" for size in suite
    }


def test_the_command_evaluates_each_size_and_reads_mteb_cache_again(setup, tmp_path, monkeypatch, capsys):
    from eval.mteb_task import SizeEncoder, main

    root, col, checkpoint, suite = setup
    args = [str(checkpoint), "--collections", f"docs={col}", "--cache", str(tmp_path), "--device", "cpu"]
    scores = main([*args, "--name", "me/minilm"])
    assert scores == {f"me/minilm-{s}": {"docs": pytest.approx(v, abs=1e-3)} for s, v in suite.items()}
    assert "| me/minilm-tall |" in capsys.readouterr().out

    def refuse(*_a, **_k):
        raise AssertionError("encoded again: the cached results were not used")

    monkeypatch.setattr(SizeEncoder, "encode", refuse)
    assert main([*args, "--name", "me/minilm"]) == scores
    with pytest.raises(SystemExit):  # no organisation in the name: one line
        main([*args, "--name", "minilm"])
    assert "needs an organisation" in capsys.readouterr().err


def test_size_model_name(tmp_path):
    size = Size("grande", 8, 256)
    config = {"config": {"name": "srl"}}
    assert size_model_name("runs/srl/model", config, size) == "local/srl-grande"
    assert size_model_name("runs/x/model", {}, size) == "local/x-grande"  # no config: the run's folder
    export = {"exported_size": size.to_dict(), "exported_from": "runs/srl/model"}
    assert size_model_name(tmp_path, export, size) == "local/srl-grande"  # whatever the export's folder
    assert size_model_name("user/srl-grande", export, size) == "user/srl-grande"  # a hub export: its id
    assert size_model_name("user/srl", config, size) == "user/srl-grande"
    assert size_model_name("runs/srl/model", config, Size("", 3, 96), "me/srl") == "me/srl-3x96"
    with pytest.raises(StarbucksError, match="ORG/NAME"):
        size_model_name("runs/srl/model", config, size, "srl")
