"""The MS MARCO / Tevatron paths users with internet take (`irds:msmarco-passage...`, `hf:Tevatron/...`),
run offline against stand-ins with the real APIs (issue 13).

- An `ir_datasets` dataset registered at test time from small local files, with msmarco-passage's record
  types (`GenericDoc`, `GenericQuery`, `TrecQrel`), integer-like ids, the real dev-small and DL19 topics and
  qrels of ../shared (graded for DL19), and passages written for them.
- A `datasets` dataset in Tevatron's exact schema (`query_id`, `query`, `positive_passages` /
  `negative_passages` lists of `{docid, title, text}`) saved as a hub-style folder and loaded through the
  `hf:` code path (`datasets.load_dataset`).
Then the four stages run end to end with configs/msmarco-bert-base.yaml's settings (CLS, dot product, group
size 8, bf16 training, graded DL19 at level 2; encoding in fp32, the CPU here) on a tiny BERT, and every eval number is
checked against pytrec_eval on the run files.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from conftest import REPO, save_tiny_backbone
from retrieval.data import load_train_groups, read_qrels_file, read_queries_file
from retrieval.runfile import read_run
from test_eval import pytrec_reference

ir_datasets = pytest.importorskip("ir_datasets")
datasets = pytest.importorskip("datasets")

PREFIX = "starbucks-offline-test"
CORPUS = f"irds:{PREFIX}/msmarco-passage"
DEV = f"irds:{PREFIX}/msmarco-passage/dev/small"
DL19 = f"irds:{PREFIX}/msmarco-passage/trec-dl-2019/judged"
SIZES = ["1x8", "2x16", "4x32"]


def _subset(topics, qrels, queries):
    qids = sorted(qrels)[:queries]
    return {q: topics[q] for q in qids}, {q: qrels[q] for q in qids}


def register_standins(root, shared) -> tuple[dict, dict]:
    """Write msmarco-passage-shaped files and register them with ir_datasets; returns the dev and DL19 subsets."""
    from ir_datasets.datasets.base import Dataset
    from ir_datasets.formats import TrecQrels, TsvDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    dev = _subset(
        read_queries_file(shared / "topics.msmarco-passage.dev-subset.txt"),
        read_qrels_file(shared / "qrels.msmarco-passage.dev-subset.txt"),
        10,
    )
    dl19 = _subset(
        read_queries_file(shared / "topics.dl19-passage.txt"), read_qrels_file(shared / "qrels.dl19-passage.txt"), 2
    )
    rng = random.Random(0)
    words = "retrieval passage index search model query ranking dense sparse vector".split()
    docs: dict[str, str] = {}
    for topics, qrels in (dev, dl19):
        for q, judged in qrels.items():
            for d, rel in judged.items():  # relevant passages echo their query, the others are noise
                docs[d] = (topics[q] + " " if rel > 0 else "") + " ".join(rng.choices(words, k=12))
    for i in range(60):  # unjudged distractors with MS MARCO-like integer ids
        docs.setdefault(str(9_000_000 + i), " ".join(rng.choices(words, k=15)))
    (root / "collection.tsv").write_text(
        "".join(f"{d}\t{t}\n" for d, t in sorted(docs.items(), key=lambda x: int(x[0])))
    )
    for name, (topics, qrels) in {"dev": dev, "dl19": dl19}.items():
        (root / f"{name}.queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in topics.items()))
        (root / f"{name}.qrels").write_text("".join(f"{q} 0 {d} {r}\n" for q, j in qrels.items() for d, r in j.items()))

    def docs_component():
        return TsvDocs(LocalDownload(root / "collection.tsv"), namespace="msmarco", lang="en")

    defs = {0: "not relevant", 1: "related", 2: "highly relevant", 3: "perfectly relevant"}
    registry = ir_datasets.registry
    for name, ds in {
        CORPUS: Dataset(docs_component()),
        DEV: Dataset(
            docs_component(),
            TsvQueries(LocalDownload(root / "dev.queries.tsv"), namespace="msmarco"),
            TrecQrels(LocalDownload(root / "dev.qrels"), defs),
        ),
        DL19: Dataset(
            docs_component(),
            TsvQueries(LocalDownload(root / "dl19.queries.tsv"), namespace="msmarco"),
            TrecQrels(LocalDownload(root / "dl19.qrels"), defs),
        ),
    }.items():
        key = name[len("irds:") :]
        if key not in registry._registered:  # once per test session
            registry.register(key, ds)
    return docs, {"dev": dev, "dl19": dl19}


def save_tevatron_groups(folder, docs: dict, splits: dict, negatives: int = 9) -> None:
    """Tevatron/msmarco-passage-aug's schema as a hub-style dataset folder (data/train-*.parquet)."""
    topics, qrels = splits["dev"]
    ids = sorted(docs)
    rng = random.Random(1)
    rows = []
    for q, judged in qrels.items():
        pos = [d for d, r in judged.items() if r > 0]
        neg = [d for d in rng.sample(ids, negatives + len(pos)) if d not in pos][:negatives]
        rows.append(
            {
                "query_id": q,
                "query": topics[q],
                "positive_passages": [{"docid": d, "title": "", "text": docs[d]} for d in pos],
                "negative_passages": [{"docid": d, "title": "", "text": docs[d]} for d in neg],
            }
        )
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))


@pytest.fixture(scope="module")
def standins(tmp_path_factory, msmarco_qrels_dir):
    root = tmp_path_factory.mktemp("msmarco")
    docs, splits = register_standins(root, msmarco_qrels_dir)
    save_tevatron_groups(root / "tevatron-aug", docs, splits)
    save_tiny_backbone(root / "backbone", layers=4, hidden=32)
    return root, docs, splits


def test_standins_have_msmarco_record_types(standins):
    root, docs, splits = standins
    ds = ir_datasets.load(DL19[len("irds:") :])
    doc = next(iter(ds.docs_iter()))
    assert type(doc).__name__ == "GenericDoc" and doc.doc_id.isdigit()
    assert type(next(iter(ds.queries_iter()))).__name__ == "GenericQuery"
    assert {r.relevance for r in ds.qrels_iter()} >= {0, 2, 3}  # graded DL judgments


def test_tevatron_groups_load_through_the_hf_path(standins):
    root, docs, splits = standins
    groups = load_train_groups(f"hf:{root / 'tevatron-aug'}", split="train")
    topics, qrels = splits["dev"]
    assert [g.query_id for g in groups] == list(qrels)
    first = groups[0]
    assert first.query == topics[first.query_id] and len(first.negatives) == 9
    assert first.positives == [docs[d] for d, r in qrels[first.query_id].items() if r > 0]


@pytest.mark.slow
def test_msmarco_config_end_to_end_offline_equals_pytrec_eval(standins, tmp_path):
    root, docs, splits = standins
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}",
        f"model.name_or_path={root / 'backbone'}",
        f"sizes={json.dumps(SIZES)}",
        f"data.corpus={CORPUS}",
        f"data.train=hf:{root / 'tevatron-aug'}",
        f"data.eval_splits.dev={DEV}",
        f"data.eval_splits.dl19={DL19}",
        "data.eval_splits.dl20=null",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.save_steps=1",
        "train.dataloader_workers=0",
        "train.holdout_queries=2",
        "train.eval_steps=2",  # the config's held-back validation, on Tevatron's docids
        "encode.batch_size=64",
        "encode.precision=fp32",
    ]
    config = REPO / "configs" / "msmarco-bert-base.yaml"
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)  # the config trains in bf16; earlier tests in fp32
    try:
        for stage in ("train", "encode", "search", "eval"):
            module = __import__(f"{stage}.__main__", fromlist=["main"])
            module.main(["--config", str(config), *overrides])
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)

    meta = json.loads((out / "model" / "starbucks.json").read_text())
    assert (meta["pooling"], meta["normalize"]) == ("cls", False)
    for name, level in (("dev", 1), ("dl19", 2)):
        report = json.loads((out / "eval" / f"{name}.json").read_text())
        topics, qrels = splits[name]
        assert report["queries"] == len(qrels) and report["rel_level"] == level
        assert report["qrels_coverage"]["missing"] == 0
        for entry in report["sizes"]:
            run = read_run(out / "runs" / name / f"{entry['size']}.trec")
            assert len(run) == len(qrels) and all(len(docs_) == min(1000, len(docs)) for docs_ in run.values())
            _, want = pytrec_reference(run, qrels, level)
            for measure in ("RR@10", "nDCG@10", "R@1000"):
                assert entry["metrics"][measure] == pytest.approx(want[measure], abs=1e-9)
        assert np.isclose(report["sizes"][-1]["metrics"]["R@1000"], 1.0)  # the corpus is shorter than the depth
