"""Shared fixtures: the repo root, the shared MS MARCO topics/qrels, tiny random BERT models."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `precision: auto` is fp32 on the CPU in the tests, whatever the chip: many compare the toolkit's vectors
# and gradients with a plain fp32 forward at tight tolerances. tests/test_cpu_precision.py unsets it to
# test auto -> bf16 (retrieval.settings.cpu_bf16) and bf16's quality against fp32.
os.environ.setdefault("STARBUCKS_CPU_BF16", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def msmarco_qrels_dir() -> Path:
    """../shared/data/msmarco-topics-qrels (skips when the shared folder is absent)."""
    d = REPO.parent / "shared" / "data" / "msmarco-topics-qrels"
    if not d.is_dir():
        pytest.skip(f"{d} not present")
    return d


def _float64(x):
    import numpy as np

    return np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, dtype=np.float64)


def assert_near(actual, expected, rel: float = 1e-5, msg: str = "", scale: float | None = None) -> None:
    """`||actual - expected|| <= rel * scale` (Frobenius norms in float64; `scale` defaults to
    `||expected||`): two float computations of one quantity agree up to summation order, however
    close to zero single elements are. Tensors or arrays."""
    import numpy as np

    a, b = _float64(actual), _float64(expected)
    assert a.shape == b.shape, f"{msg} shapes differ: {a.shape} vs {b.shape}"
    err = float(np.linalg.norm(a - b))
    scale = float(np.linalg.norm(b)) if scale is None else scale
    assert err <= rel * scale or err == 0.0, f"{msg} error {err:.3g} > {rel:g} x {scale:.3g}"


def assert_all_near(actual, expected, rel: float = 1e-5) -> None:
    """Two sets of tensors (gradients, weights; dicts by name or lists in one order) agree, tensor by
    tensor, to `rel` of the whole set's norm: a tensor whose true value is (near) zero (a key bias's
    gradient, by softmax's shift invariance; a LayerNorm bias one step from its zero init) holds
    only rounding noise, which no scale of its own can judge."""
    import numpy as np

    names = list(expected.keys()) if isinstance(expected, dict) else list(range(len(expected)))
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), set(actual) ^ set(expected)
    else:
        assert len(actual) == len(expected)
    total = float(np.sqrt(sum(np.linalg.norm(_float64(expected[k])) ** 2 for k in names)))
    for k in names:
        assert_near(actual[k], expected[k], rel=rel, msg=str(k), scale=total)


def tiny_bert(layers: int = 4, hidden: int = 32, vocab: int = 1000, seed: int = 0):
    """A randomly initialised BERT small enough for CPU tests."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    return BertModel(config).eval()


def mini_slice(col: Path, queries: int = 20, passages: int = 300):
    """A BEIR collection at `col`: the first `queries` dev queries of debian-pkgs-mini, their positives
    and other passages up to `passages`, and the mini training groups that stay inside it.
    Returns `(col, qids, dev split of the mini collection)`."""
    from retrieval.data import iter_corpus, load_split

    mini = REPO / "data" / "debian-pkgs-mini"
    dev = load_split("dev", str(mini))
    qids = sorted(dev.qrels)[:queries]
    wanted = {next(iter(dev.qrels[q])) for q in qids}
    corpus = [(d, t) for d, t in iter_corpus(str(mini)) if d in wanted]
    corpus += list(
        itertools.islice(((d, t) for d, t in iter_corpus(str(mini)) if d not in wanted), passages - len(corpus))
    )
    (col / "qrels").mkdir(parents=True)
    with gzip.open(col / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": d, "text": t}) + "\n" for d, t in sorted(corpus))
    (col / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": dev.queries[q]}) + "\n" for q in qids))
    (col / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{next(iter(dev.qrels[q]))}\t1\n" for q in qids)
    )
    ids = {d for d, _ in corpus}
    groups = [json.loads(line) for line in gzip.open(mini / "train.jsonl.gz", "rt")]
    groups = [
        dict(g, negative_document_ids=[n for n in g["negative_document_ids"] if n in ids])
        for g in groups
        if g["positive_document_ids"][0] in ids
    ]
    with open(col / "train.jsonl", "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in groups if g["negative_document_ids"])
    return col, qids, dev


def save_tiny_backbone(path: Path, layers: int = 4, hidden: int = 32):
    """A tiny random BERT with MiniLM's tokenizer saved as a Starbucks model directory."""
    from transformers import AutoTokenizer

    from retrieval.checkpoint import resolve_model_path, save_encoder
    from retrieval.encoder import StarbucksEncoder

    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    save_encoder(StarbucksEncoder(tiny_bert(layers=layers, hidden=hidden, vocab=tok.vocab_size), "cls"), path, tok)
    return path


def beir_slice(source: Path, out: Path, split: str, queries: int, passages: int, skip: int = 0) -> Path:
    """A BEIR collection at `out` with `queries` judged queries of `source`'s split (after the first `skip`),
    their relevant passages, and other passages up to `passages`; qrels under `test`."""
    from retrieval.data import iter_corpus, load_split

    judged = load_split(split, str(source))
    qids = sorted(judged.qrels)[skip : skip + queries]
    wanted = {d for q in qids for d in judged.qrels[q]}
    corpus = [(d, t) for d, t in iter_corpus(str(source)) if d in wanted]
    for d, t in iter_corpus(str(source)):
        if len(corpus) >= passages:
            break
        if d not in wanted:
            corpus.append((d, t))
    (out / "qrels").mkdir(parents=True)
    with gzip.open(out / "corpus.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"_id": d, "text": t}) + "\n" for d, t in sorted(corpus))
    (out / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": judged.queries[q]}) + "\n" for q in qids))
    (out / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{r}\n" for q in qids for d, r in judged.qrels[q].items())
    )
    return out


def run_two_gloo_ranks(script, *args: str):
    """Run `script` (a test module with a `__main__` part) as 2 torchrun ranks on the CPU; asserts it succeeded."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    return launched


def die_after_checkpoint(monkeypatch, step: int) -> None:
    """Make training stop with a KeyboardInterrupt (a kill) right after checkpoint `step` is committed."""
    from train.checkpoint import Checkpoints

    commit = Checkpoints.commit

    def commit_then_die(self, staging, at):
        path = commit(self, staging, at)
        if at == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Checkpoints, "commit", commit_then_die)


def ragged_ids(n: int, length: int, generator, low: int = 5, high: int = 1000) -> dict:
    """`n` rows of random token ids in [low, high), each padded after a random length >= 3 (right padding)."""
    import torch

    ids = torch.randint(low, high, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, torch.randint(3, length + 1, (1,), generator=generator).item() :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}
