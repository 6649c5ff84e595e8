"""train.export: each exported size is a standalone sentence-transformers model equal to StarbucksModel at
that size; the model card (sizes, training, eval's numbers); hub upload up to the call, dry run."""

import json

import numpy as np
import pytest
import yaml

from conftest import tiny_bert
from eval import evaluate_experiment
from retrieval import StarbucksModel
from retrieval.card import RESULTS_FILE
from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder
from retrieval.runfile import run_path, write_run, write_run_record
from train.export import export, main as export_main, upload_files

st = pytest.importorskip("sentence_transformers")

TEXTS = ["apt installs packages", "a", "the quick brown fox jumps over the lazy dog " * 3, "font editor"]
SIZES = [
    {"name": "small", "layers": 1, "dim": 8},
    {"name": "mid", "layers": 2, "dim": 16},
    {"name": "full", "layers": 4, "dim": 32},
]
CHECKPOINT_FILES = {
    "README.md",
    "config.json",
    "model.safetensors",
    "starbucks.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def save_tiny(path, pooling, normalize):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    config = {
        "name": "tiny-exp",
        "output_dir": "runs/tiny-exp",
        "train": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-5},
        "data": {"train": "data/x/train.jsonl"},
    }
    save_encoder(
        StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=7), pooling, normalize),
        path,
        tok,
        {
            "sizes": SIZES,
            "query_max_length": 8,
            "passage_max_length": 16,
            "method": "srl",
            "base_model": "sentence-transformers/all-MiniLM-L6-v2",
            "step": 12,
            "config": config,
        },
    )
    return path


@pytest.fixture(scope="module", params=[("cls", False), ("mean", True)], ids=["cls-dot", "mean-cosine"])
def exported(request, tmp_path_factory):
    pooling, normalize = request.param
    root = tmp_path_factory.mktemp(f"export-{pooling}")
    model_dir = save_tiny(root / "model", pooling, normalize)
    export_main([str(model_dir), "--all", "--out", str(root / "st")])
    return model_dir, root / "st", normalize


def test_each_exported_size_is_that_sizes_embedding_in_sentence_transformers(exported):
    model_dir, out, normalize = exported
    model = StarbucksModel.from_pretrained(model_dir, "cpu")
    assert sorted(p.name for p in out.iterdir()) == ["full", "mid", "small"]
    for size in model.sizes:
        folder = out / size.name
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == size.layers  # layers cut
        modules = json.loads((folder / "modules.json").read_text())
        assert all((folder / m["path"]).is_dir() for m in modules)  # Normalize's folder too
        assert any(m["path"].endswith("_Normalize") for m in modules) == normalize
        loaded = st.SentenceTransformer(str(folder), device="cpu")
        got = loaded.encode(TEXTS, batch_size=3)
        assert got.shape == (len(TEXTS), size.dim)
        want = model.encode(TEXTS, size.name)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        if normalize:  # the dims were cut before Normalize: unit vectors, not a cut of the full unit vector
            np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
        # the export is a one-size Starbucks checkpoint too
        again = StarbucksModel.from_pretrained(folder, "cpu")
        assert [s.name for s in again.sizes] == [size.name]
        np.testing.assert_allclose(again.encode(TEXTS), want, atol=1e-5, rtol=0)


def test_truncate_dim_would_differ_for_a_normalised_model(exported):
    """Why the export cuts before Normalize: ST's truncate_dim on the full model cuts the unit vector."""
    model_dir, _, normalize = exported
    if not normalize:
        pytest.skip("for a dot-product model truncate_dim is the same cut")
    model = StarbucksModel.from_pretrained(model_dir, "cpu")
    cut_after = st.SentenceTransformer(str(model_dir), device="cpu", truncate_dim=8).encode(TEXTS)
    assert cut_after.shape == (len(TEXTS), 8)
    assert np.abs(cut_after - model.encode(TEXTS, "4x8")).max() > 1e-2


def test_the_card_has_the_sizes_the_training_and_the_citation(exported):
    model_dir, out, normalize = exported
    card = (model_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "sentence-transformers" and "starbucks" in front["tags"]
    assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and "model-index" not in front
    assert "| mid | 2 | 16 | 32 | 64 |" in card  # bytes per passage: 16 dims x 2 (fp16), x 4 (fp32)
    assert "- method: `srl`" in card and "- steps: `12`" in card and "- training data: `data/x/train.jsonl`" in card
    assert "arXiv:2410.13230" in card
    # a trained model is saved under a temporary name first: the examples name its place in the experiment
    assert "StarbucksModel.from_pretrained('runs/tiny-exp/model')" in card
    exported_card = (out / "mid" / "README.md").read_text()
    assert "# tiny-exp-mid" in exported_card and f"from_pretrained({str(out / 'mid')!r})" in exported_card
    assert ("cosine similarity" in card) == normalize


def test_eval_puts_its_numbers_into_the_card_and_an_export_keeps_its_sizes(tmp_path):
    exp = tmp_path / "exp"
    model_dir = save_tiny(exp / "model", "cls", False)
    col = tmp_path / "col"
    (col / "qrels").mkdir(parents=True)
    (col / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "text": "x"}) + "\n" for i in range(8)))
    (col / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": "y"}) + "\n" for i in range(4)))
    (col / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4))
    )
    for name, layers, dim, rank in [("small", 1, 8, 2), ("mid", 2, 16, 1)]:  # the relevant passage's rank
        rankings = []
        for i in range(4):
            docs = [f"d{(i + j + 1) % 8}" for j in range(5)]
            docs.insert(rank - 1, f"d{i}")
            rankings.append((f"q{i}", [(d, 10.0 - r) for r, d in enumerate(docs)]))
        path = run_path(exp / "runs", "dev", name)
        write_run(path, rankings, "t")
        write_run_record(path, {"size": name, "layers": layers, "dim": dim})
    cfg = load_config(None, [f"output_dir={exp}", "name=exp", "eval.metrics=[RR@10,R@5]", "eval.plot=false"])
    cfg.data.eval_splits = {"dev": str(col)}
    evaluate_experiment(cfg)
    written = json.loads((exp / "eval" / "dev.json").read_text())
    values = {s["size"]: s["metrics"]["RR@10"] for s in written["sizes"]}
    assert values == {"small": 0.5, "mid": 1.0}
    card = (model_dir / "README.md").read_text()
    assert "| size | R@5 | RR@10 |" in card  # eval's JSON keeps the measures sorted
    assert "| small (1x8) | 1.0000 | 0.5000 |" in card and "| mid (2x16) | 1.0000 | 1.0000 |" in card
    front = yaml.safe_load(card.split("---\n")[1])
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {"type": "rr_at_10", "name": "RR@10 small (1x8)", "value": 0.5} in metrics
    assert json.loads((model_dir / RESULTS_FILE).read_text())["dev"]["sizes"][0]["metrics"]["RR@10"] == 0.5

    export(str(model_dir), ["mid"], tmp_path / "mid")
    exported_card = (tmp_path / "mid" / "README.md").read_text()
    assert "| mid (2x16) | 1.0000 | 1.0000 |" in exported_card and "small (1x8)" not in exported_card

    # a re-save (new weights) drops the results of the old ones
    StarbucksModel.from_pretrained(model_dir, "cpu").save(model_dir)
    assert not (model_dir / RESULTS_FILE).exists() and "## Results" not in (model_dir / "README.md").read_text()


def test_the_card_is_left_alone_when_the_embeddings_came_from_another_model(tmp_path):
    from retrieval.checkpoint import refresh_card

    model_dir = save_tiny(tmp_path / "model", "cls", False)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "dev.json").write_text(
        json.dumps(
            {
                "split": "dev",
                "queries": 1,
                "measures": {"RR@10": "RR@10"},
                "sizes": [{"size": "mid", "layers": 2, "dim": 16, "metrics": {"RR@10": 0.25}}],
            }
        )
    )
    (tmp_path / "emb" / "mid").mkdir(parents=True)
    (tmp_path / "emb" / "mid" / "meta.json").write_text(json.dumps({"model": str(tmp_path / "elsewhere")}))
    assert refresh_card(model_dir, tmp_path / "eval", embeddings=tmp_path / "emb") is None
    assert "0.2500" not in (model_dir / "README.md").read_text()
    (tmp_path / "emb" / "mid" / "meta.json").write_text(json.dumps({"model": str(model_dir)}))
    assert refresh_card(model_dir, tmp_path / "eval", embeddings=tmp_path / "emb") is not None
    assert "| mid (2x16) | 0.2500 |" in (model_dir / "README.md").read_text()


def test_dry_run_lists_the_files_of_the_folder(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model", "mean", True)
    out = tmp_path / "mid"
    export_main([str(model_dir), "--size", "mid", "--out", str(out), "--push-to-hub", "me/tiny-mid", "--dry-run"])
    (out / ".cache").mkdir()
    (out / ".cache" / "x").write_text("hidden")
    listed = capsys.readouterr().out.split()
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert set(listed) == files == set(upload_files(out))
    assert CHECKPOINT_FILES | {"2_Dense/config.json", "2_Dense/model.safetensors"} <= set(listed)
    assert "StarbucksModel.from_pretrained('me/tiny-mid')" in (out / "README.md").read_text()


def test_push_calls_the_hub_with_the_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model_dir = save_tiny(tmp_path / "model", "cls", False)
    result = export(str(model_dir), None, push="me/tiny", private=True)  # the checkpoint itself, every size
    (create, repo, create_kw), (upload, repo2, kw) = calls
    assert (create, repo, create_kw["private"], create_kw["exist_ok"]) == ("create_repo", "me/tiny", True, True)
    assert (upload, repo2, kw["folder_path"]) == ("upload_folder", "me/tiny", str(model_dir))
    assert kw["allow_patterns"] == result.uploads["me/tiny"] and CHECKPOINT_FILES <= set(kw["allow_patterns"])
    assert "2_Dense/config.json" not in kw["allow_patterns"]  # the largest size is the full width: no slice


def test_refusals_are_one_line(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model", "cls", False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    for argv, message in [
        ([str(model_dir), "--size", "grande", "--out", str(tmp_path / "x")], "unknown size 'grande'"),
        ([str(model_dir), "--size", "8x8", "--out", str(tmp_path / "x")], "asks for 8 layers"),
        ([str(tmp_path / "other"), "--size", "mid", "--out", str(tmp_path / "x")], "is not a model directory"),
        ([str(model_dir), "--size", "mid", "--out", str(tmp_path / "other")], "exists and is not a model folder"),
        ([str(model_dir), "--size", "mid"], "give --out DIR"),
        ([str(model_dir)], "nothing to do"),
        ([str(model_dir), "--push-to-hub", "nouser", "--dry-run"], "is not a hub repository id"),
    ]:
        with pytest.raises(SystemExit) as err:
            export_main(argv)
        assert err.value.code == 2
        err = capsys.readouterr().err  # (transformers' loading bars aside) one line, no traceback
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (argv, err)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(StarbucksError, match="give size= or sizes=, not both"):
        StarbucksModel.from_pretrained(model_dir, "cpu").encode(TEXTS, "mid", sizes=["mid"])
