"""`python -m eval.sizes`: the Pareto front on a hand-made table, budgets, and a real run's report."""

import json

import pytest

from conftest import mini_slice, save_tiny_backbone
from eval.sizes import SizeCost, best_within, main, pareto_front
from retrieval.errors import StarbucksError
from retrieval.sizes import Size

SIZES = ["1x8", "2x16", "4x32"]


def test_pareto_front_on_a_hand_made_table():
    # (cost, quality); by hand: a is cheapest; b is better than a for more; c costs more than b for less (off);
    # d is the best; e ties b exactly (both stay: neither is strictly better); f equals d's quality at a
    # higher cost (off); g is as cheap as a but worse (off)
    points = {
        "a": (1.0, 0.20),
        "b": (2.0, 0.30),
        "c": (3.0, 0.25),
        "d": (5.0, 0.50),
        "e": (2.0, 0.30),
        "f": (6.0, 0.50),
        "g": (1.0, 0.10),
    }
    names = list(points)
    assert [names[i] for i in pareto_front(list(points.values()))] == ["a", "b", "d", "e"]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 0.0)]) == [0]


def cost(name, quality, latency, nbytes):
    return SizeCost(Size(name, 1, 8), quality, 100.0, latency / 2, latency / 2, latency, nbytes)


def test_best_size_within_a_budget():
    costs = [cost("s", 0.2, 1.0, 16), cost("m", 0.3, 2.0, 64), cost("l", 0.5, 5.0, 256), cost("m2", 0.3, 1.5, 64)]
    assert best_within(costs).size.name == "l"
    assert best_within(costs, max_latency_ms=4.0).size.name == "m2"  # m and m2 tie on quality: the faster
    assert best_within(costs, max_bytes=63).size.name == "s"
    assert best_within(costs, max_latency_ms=1.6, max_bytes=64).size.name == "m2"
    with pytest.raises(StarbucksError, match="no size fits --max-latency-ms 0.5; the cheapest is s") as err:
        best_within(costs, max_latency_ms=0.5)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A zero-shot tiny model encoded, searched and evaluated on a slice of debian-pkgs-mini."""
    from encode.pipeline import encode_collection
    from eval.pipeline import evaluate_experiment
    from retrieval.config import load_config
    from search.pipeline import search_collection

    root = tmp_path_factory.mktemp("sizes")
    col, _, _ = mini_slice(root / "col", queries=12, passages=150)
    save_tiny_backbone(root / "backbone", layers=4, hidden=32)
    (root / "exp.yaml").write_text(f"""
name: chooser
output_dir: {root / "run"}
model: {{name_or_path: {root / "backbone"}, pooling: cls, query_max_length: 16, passage_max_length: 48}}
sizes: {json.dumps(SIZES)}
data: {{corpus: {col}, eval_splits: {{dev: {col}}}}}
encode: {{model: {root / "backbone"}, batch_size: 32, shard_rows: 64}}
search: {{depth: 10}}
eval: {{metrics: [nDCG@10, RR@10], plot: false}}
""")
    cfg = load_config(root / "exp.yaml")
    encode_collection(cfg, progress=False)
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)
    return root


def test_report_of_a_run(run, capsys):
    run_dir = run / "run"
    with pytest.raises(SystemExit) as exit_:  # a zero-shot model records no eval splits
        main([str(run_dir), "--passages", "16", "--query-sample", "3"])
    assert exit_.value.code == 2 and "give --queries" in capsys.readouterr().err

    args = [str(run_dir), "--queries", str(run / "col"), "--passages", "16", "--query-sample", "3", "--device", "cpu"]
    best = main([*args, "--max-bytes", "40"])
    report = json.loads((run_dir / "eval" / "sizes-dev.json").read_text())
    evaluated = {
        s["size"]: s["metrics"]["nDCG@10"] for s in json.loads((run_dir / "eval" / "dev.json").read_text())["sizes"]
    }
    assert report["measure"] == "nDCG@10" and [s["size"] for s in report["sizes"]] == SIZES
    for s in report["sizes"]:
        assert s["quality"] == evaluated[s["size"]]
        shards = -(-150 // 64)
        assert 2 * s["dim"] <= s["bytes_per_passage"] <= 2 * s["dim"] + 256 * shards / 150  # float16 + npy headers
        assert s["passages_per_second"] > 0 and s["latency_ms"] >= s["encode_ms"] > 0 and s["search_ms"] > 0
    within = [s for s in report["sizes"] if s["bytes_per_passage"] <= 40]
    assert [s["size"] for s in within] == ["1x8", "2x16"]  # 16 and 32 bytes of float16 (+ headers)
    assert best.size.name in ("1x8", "2x16") and best.quality == max(s["quality"] for s in within)
    for stem in ("json", "md", "csv", "png"):
        assert (run_dir / "eval" / f"sizes-dev.{stem}").stat().st_size > 0
    points = [(s["bytes_per_passage"], s["quality"]) for s in report["sizes"]]
    assert report["front_bytes"] == [report["sizes"][i]["size"] for i in pareto_front(points)]
    assert "best within --max-bytes 40" in capsys.readouterr().out

    with pytest.raises(SystemExit):
        main([*args, "--max-bytes", "1"])
    assert "no size fits --max-bytes 1" in capsys.readouterr().err


def test_a_run_searched_on_an_index_is_timed_on_that_index(run, tmp_path, capsys, monkeypatch):
    """An IVF run: latency on its saved index with the run's nprobe, bytes from the index file; an index
    that was built from other embeddings is refused in one line."""
    import shutil

    import retrieval.exact_search as exact_search
    from eval.pipeline import evaluate_experiment
    from retrieval.config import load_config
    from search.pipeline import search_collection

    shutil.copytree(run / "run", tmp_path / "run")
    config = tmp_path / "exp.yaml"
    config.write_text((run / "exp.yaml").read_text().replace(str(run / "run"), str(tmp_path / "run")))
    cfg = load_config(config, ["search.index=IVF2,Flat", "search.params.nprobe=2"])
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)

    applied = []
    real = exact_search.set_params
    monkeypatch.setattr(
        exact_search,
        "set_params",
        lambda index, params, gpu=False: (applied.append(dict(params)), real(index, params, gpu)),
    )
    run_dir = tmp_path / "run"
    args = [str(run_dir), "--queries", str(run / "col"), "--passages", "16", "--query-sample", "3", "--device", "cpu"]
    main(args)
    report = json.loads((run_dir / "eval" / "sizes-dev.json").read_text())
    for s in report["sizes"]:
        index = run_dir / "index" / f"{s['size']}.faiss"
        assert s["bytes_per_passage"] == index.stat().st_size / 150
    assert applied == [{"nprobe": 2}] * len(SIZES)

    record = run_dir / "index" / "1x8.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "texts_sha256": "other"}))
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and "1x8.faiss was not built from the embeddings" in capsys.readouterr().err


def test_precision_is_an_axis_of_the_search_the_eval_and_the_chooser(run, tmp_path):
    """search.quantization: a run file per (size, precision), each the quantised search's ranking; eval rows
    and chooser points per (size, precision); bytes from the codes' index file (+ the fp16 shards when
    re-scoring)."""
    import shutil

    from eval.pipeline import evaluate_experiment
    from retrieval.config import load_config
    from retrieval.quantize import Quantization, quantized_search
    from retrieval.runfile import read_run
    from retrieval.store import EmbeddingStore
    from search.pipeline import search_collection

    shutil.copytree(run / "run", tmp_path / "run")
    config = tmp_path / "exp.yaml"
    config.write_text((run / "exp.yaml").read_text().replace(str(run / "run"), str(tmp_path / "run")))
    precisions = ["fp16", "int8", "binary", "binary-rescore50"]
    cfg = load_config(config, [f"search.quantization=[{','.join(precisions)}]"])
    search_collection(cfg, progress=False)
    evaluate_experiment(cfg)
    run_dir = tmp_path / "run"

    # each quantised run file ranks what the library's quantised search ranks (fp16 runs are unchanged)
    store = EmbeddingStore(run_dir / "embeddings" / "2x16")
    qids, qvecs, _ = store.load_queries("dev")
    pids = store.ids()
    for spec in ("int8", "binary-rescore50"):
        quantization = Quantization(*{"int8": ("int8", 0), "binary-rescore50": ("binary", 50)}[spec])
        _, rows = quantized_search(store, qvecs, 10, quantization)
        ranked = read_run(run_dir / "runs" / "dev" / f"2x16.{spec}.trec")
        for qid, row in zip(qids, rows):
            assert sorted(ranked[qid], key=ranked[qid].get, reverse=True) == [pids[r] for r in row]
    assert (run_dir / "runs" / "dev" / "2x16.trec").read_bytes() == (
        run / "run" / "runs" / "dev" / "2x16.trec"
    ).read_bytes()

    # a size named alone brings its precisions; a precision named in full comes alone
    from eval.pipeline import select_runs

    picked = [s.name for s, _ in select_runs(run_dir / "runs", "dev", ["2x16"])]
    assert picked == ["2x16", "2x16.binary", "2x16.binary-rescore50", "2x16.int8"]
    assert [s.name for s, _ in select_runs(run_dir / "runs", "dev", ["2x16.int8"])] == ["2x16.int8"]

    evaluated = json.loads((run_dir / "eval" / "dev.json").read_text())["sizes"]
    names = [s["size"] for s in evaluated]
    assert names == [
        f"{s}{'' if p == 'fp16' else '.' + p}"
        for s in SIZES
        for p in sorted(precisions, key=lambda p: (p != "fp16", p))
    ]

    main([str(run_dir), "--queries", str(run / "col"), "--passages", "16", "--query-sample", "3", "--device", "cpu"])
    report = json.loads((run_dir / "eval" / "sizes-dev.json").read_text())
    by_name = {s["size"]: s for s in report["sizes"]}
    assert set(by_name) == set(names)
    for size in SIZES:
        dim = by_name[size]["dim"]
        int8 = by_name[f"{size}.int8"]
        assert int8["precision"] == "int8"
        assert int8["bytes_per_passage"] == (run_dir / "index" / f"{size}.int8.faiss").stat().st_size / 150
        assert dim <= int8["bytes_per_passage"] <= dim + 1024 / 150  # one byte a dim + the header and ranges
        binary = by_name[f"{size}.binary"]["bytes_per_passage"]
        assert dim / 8 <= binary <= dim / 8 + 1024 / 150
        rescored = by_name[f"{size}.binary-rescore50"]["bytes_per_passage"]
        assert rescored == pytest.approx(binary + by_name[size]["bytes_per_passage"], rel=1e-12)  # codes + fp16 shards
        # the encode rate is the size's, whatever the precision searched
        assert len({by_name[n]["passages_per_second"] for n in by_name if n.split(".")[0] == size}) == 1


def test_quantised_runs_alone_are_found_by_size_and_refused_once_the_store_changes(run, tmp_path, monkeypatch):
    """A size searched only at int8 is still named `1x8` in eval.sizes; the int8 search asks FAISS once when
    no tie crosses the k-th score; a run searched on embeddings that were re-encoded since is refused."""
    import shutil

    import retrieval.quantize as quantize
    from eval.pipeline import evaluate_experiment, select_runs
    from retrieval.config import load_config
    from search.pipeline import search_collection

    shutil.copytree(run / "run", tmp_path / "run")
    for path in (tmp_path / "run" / "runs").rglob("*"):
        if path.is_file():
            path.unlink()
    config = tmp_path / "exp.yaml"
    config.write_text((run / "exp.yaml").read_text().replace(str(run / "run"), str(tmp_path / "run")))
    asked = []
    real = quantize._search_codes
    monkeypatch.setattr(
        quantize,
        "_search_codes",
        lambda index, kind, queries, k, *a: (asked.append(k), real(index, kind, queries, k, *a))[1],
    )
    search_collection(load_config(config, ["search.quantization=[int8]"]), progress=False)
    assert asked == [11] * len(SIZES)  # depth 10 + 1: the scores below the 10th are lower, no second pass
    runs = tmp_path / "run" / "runs"
    assert [s.name for s, _ in select_runs(runs, "dev", ["1x8"])] == ["1x8.int8"]
    assert [s.name for s, _ in select_runs(runs, "dev", ["2x16"])] == ["2x16.int8"]
    sizes, _ = zip(*select_runs(runs, "dev", None))
    assert len({s.ident for s in sizes}) == len(SIZES) and all(s.precision == "int8" for s in sizes)

    shutil.copytree(tmp_path / "run", tmp_path / "before")  # a copy of the experiment, kept to compare with
    meta_path = tmp_path / "run" / "embeddings" / "1x8" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model_sha256": "re-encoded"}))
    with pytest.raises(StarbucksError, match="1x8.int8.trec was searched on other embeddings .*model_sha256 changed"):
        evaluate_experiment(load_config(config, ["search.quantization=[int8]"]))
    # the copy's runs name the original's stores; they are judged by the copy's own (unchanged) stores
    copied = load_config(config, ["search.quantization=[int8]", f"output_dir={tmp_path / 'before'}"])
    assert set(evaluate_experiment(copied)) == {"dev"}
    (tmp_path / "before" / "embeddings" / "1x8" / "meta.json").write_text(meta_path.read_text())
    with pytest.raises(StarbucksError, match="before/embeddings/1x8 holds now"):
        evaluate_experiment(copied)
    # runs kept apart from the experiment (paths.runs elsewhere) are still judged by the stores they name
    shutil.move(tmp_path / "run" / "runs", tmp_path / "apart")
    apart = load_config(config, ["search.quantization=[int8]", f"paths.runs={tmp_path / 'apart'}"])
    with pytest.raises(StarbucksError, match="run/embeddings/1x8 holds now"):
        evaluate_experiment(apart)
