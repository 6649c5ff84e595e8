"""The four stages chained through their command lines, checked against a brute-force search.

A tiny random BERT is fine-tuned with SRL on a slice of debian-pkgs-mini, then encode, search
and eval run as a user would run them. The run file of every size must equal a numpy top-k
over embeddings computed directly with the trained model, and the eval JSON must equal
pytrec_eval's reciprocal rank of that run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytrec_eval
import torch

from conftest import mini_slice, save_tiny_backbone
from retrieval.data import iter_corpus
from retrieval.checkpoint import load_encoder
from retrieval.encoder import tokenize
from retrieval.runfile import read_run
from retrieval.sizes import SizeList

SIZES = ["1x8", "2x16", "4x32"]
PASSAGES = 300


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """A small BEIR slice, a tiny model and a config that drives all four stages."""
    root = tmp_path_factory.mktemp("pipeline")
    col, qids, dev = mini_slice(root / "col", queries=20, passages=PASSAGES)
    save_tiny_backbone(root / "backbone", layers=4, hidden=32)
    (root / "exp.yaml").write_text(f"""
name: e2e
output_dir: {root / "runs"}
model: {{name_or_path: {root / "backbone"}, pooling: cls, normalize: false,
        query_max_length: 16, passage_max_length: 48}}
sizes: {json.dumps(SIZES)}
data: {{corpus: {col}, train: {col / "train.jsonl"}, eval_splits: {{dev: {col}}}}}
train: {{batch_size: 4, group_size: 2, max_steps: 4, save_steps: 2, learning_rate: 1.0e-3, temperature: 1.0}}
encode: {{batch_size: 32, shard_rows: 128}}
search: {{depth: 10}}
eval: {{metrics: [RR@10, nDCG@10], plot: false}}
""")
    return root, qids, dev


def run_stage(stage: str, config, *overrides: str) -> None:
    module = __import__(f"{stage}.__main__", fromlist=["main"])
    module.main(["--config", str(config), *overrides])


def test_train_encode_search_eval_equal_a_brute_force_search(experiment):
    root, qids, dev = experiment
    config = root / "exp.yaml"
    for stage in ("train", "encode", "search", "eval"):
        run_stage(stage, config)

    model_dir = root / "runs" / "model"
    encoder, tok, meta = load_encoder(str(model_dir))
    sizes = SizeList.from_config(meta["sizes"])
    assert [s.key for s in sizes] == SIZES and meta["method"] == "srl"
    docs = sorted(iter_corpus(str(root / "col")))
    with torch.no_grad():
        p = encoder.eval().embed(tokenize(tok, [t for _, t in docs], 48), sizes)
        q = encoder.embed(tokenize(tok, [dev.queries[x] for x in qids], 16), sizes)
    report = json.loads((root / "runs" / "eval" / "dev.json").read_text())
    for size in sizes:
        # fp16 storage of the embeddings: compare with the same rounding
        scores = q[size].half().float().numpy() @ p[size].half().float().numpy().T
        run = read_run(root / "runs" / "runs" / "dev" / f"{size.name}.trec")
        row = {d: j for j, (d, _) in enumerate(docs)}
        for i, qid in enumerate(qids):
            got = run[qid]
            # each returned passage carries its brute-force score, and they are the top 10 scores
            # (a random tiny model has near-ties, so compare scores rather than the order of ids)
            np.testing.assert_allclose([got[d] for d in got], [scores[i, row[d]] for d in got], rtol=1e-3, atol=1e-3)
            np.testing.assert_allclose(
                sorted(got.values(), reverse=True), np.sort(scores[i])[::-1][:10], rtol=1e-3, atol=1e-3
            )
        expected = pytrec_eval.RelevanceEvaluator({k: dev.qrels[k] for k in qids}, {"recip_rank"}).evaluate(
            {k: {d: float(s) for d, s in v.items()} for k, v in run.items()}
        )
        got = next(r["metrics"]["RR@10"] for r in report["sizes"] if r["size"] == size.name)
        assert got == pytest.approx(np.mean([expected[k]["recip_rank"] for k in qids]), abs=1e-9)


def test_stage_errors_are_one_line(experiment, capsys):
    root, _, _ = experiment
    with pytest.raises(SystemExit) as exit_info:
        run_stage("encode", root / "exp.yaml", "encode.sizes=9x8")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (above it, only progress bars)
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert last.startswith("error: ") and "asks for 9 layers" in last and "has only 4" in last
    with pytest.raises(SystemExit):
        run_stage("train", root / "exp.yaml", "train.lerning_rate=1")
    assert "did you mean 'train.learning_rate'" in capsys.readouterr().err
