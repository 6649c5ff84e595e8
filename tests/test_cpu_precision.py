"""`precision: auto` on the CPU: bf16 autocast exactly where the chip has native bf16 (AVX512-BF16 or
AMX), fp32 elsewhere; bf16's vectors, rankings and training losses against fp32's.

tests/conftest.py pins `STARBUCKS_CPU_BF16=0` (auto = fp32) for the tests that compare with plain fp32
references; the tests here unset it, or set it, themselves.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import retrieval.settings as settings
from conftest import REPO, tiny_bert
from retrieval.config import load_config, sizes_of
from retrieval.errors import StarbucksError
from retrieval.model import StarbucksModel
from retrieval.settings import CPU_BF16_ENV, resolve_precision

CPU = torch.device("cpu")
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINI = REPO / "data" / "debian-pkgs-mini"

# bf16 against fp32, MiniLM (mean pooling, normalised) on debian-pkgs-mini: each size's vectors within
# VECTOR_TOLERANCE of their norm (every vector), and the top-10 of 50 dev queries over 550 passages
# sharing at least TOP10_FLOOR of their members on average. Measured on AVX512-BF16 (AMD EPYC):
# per-vector error mean 0.3-0.5%, max 0.8%; top-10 overlap 0.988-0.998 per size.
VECTOR_TOLERANCE = 0.02
TOP10_FLOOR = 0.95
# A few SRL steps of a tiny model: bf16's loss within LOSS_TOLERANCE (relative) of fp32's at each step
# (measured: ~1e-4).
LOSS_TOLERANCE = 0.005


@pytest.fixture
def chip(monkeypatch):
    """`chip(True)`: this CPU has native bf16 (as far as `resolve_precision` knows); no override."""
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)

    def set_chip(native: bool):
        monkeypatch.setattr(settings, "cpu_has_native_bf16", lambda: native)

    return set_chip


# ---------------------------------------------------------------- what auto resolves to


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(chip, native):
    from train.trainer import mixed_precision

    chip(native)
    expected = "bf16" if native else "fp32"
    assert resolve_precision("auto", CPU, "encode.precision") == expected
    assert resolve_precision("auto", CPU, "train.precision", "bf16", cpu_fp16=False) == expected
    assert mixed_precision("auto", cuda=False) == ("bf16" if native else "no")
    assert resolve_precision("auto", CPU, "search.torch_dtype", cpu_auto_bf16=False) == "fp32"  # no bf16 there
    for given in ("fp32", "bf16", "float32", "bfloat16"):  # a named precision is kept on every chip
        assert resolve_precision(given, CPU, "encode.precision") == given.replace("float", "fp").replace("bfp", "bf")
    with pytest.raises(StarbucksError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU, "train.precision", "bf16", cpu_fp16=False)


def test_the_probe_reads_torchs_cpu_capabilities(monkeypatch):
    for caps, native in [
        ({"avx512_bf16": True, "amx_bf16": False}, True),
        ({"amx_bf16": True}, True),
        ({"avx512_f": True, "avx512_vnni": True, "avx512_bf16": False}, False),
        ({}, False),
    ]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert settings.cpu_has_native_bf16() is native
    monkeypatch.undo()
    caps = torch.cpu.get_capabilities()
    print(
        f"this CPU: avx512_bf16={caps.get('avx512_bf16')} amx_bf16={caps.get('amx_bf16')} "
        f"-> auto = {'bf16' if settings.cpu_has_native_bf16() else 'fp32'}"
    )


def test_the_environment_overrides_the_chip(chip, monkeypatch):
    chip(True)
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_precision("auto", CPU, "encode.precision") == "fp32"
    chip(False)
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_precision("auto", CPU, "encode.precision") == "bf16"
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(StarbucksError, match=CPU_BF16_ENV):
        resolve_precision("auto", CPU, "encode.precision")


def test_auto_fingerprints_a_training_run_by_what_it_resolved_to(chip, tmp_path):
    """The run's fingerprint holds the resolved precision, so a resume on another chip (or with the
    override) is refused instead of continuing in another precision."""
    chip(True)
    config = tiny_run_config(tmp_path, tmp_path / "tiny")
    run_dir = tiny_run(config, "train.precision=auto")
    state = json.loads(next(run_dir.glob("checkpoints/checkpoint-*/trainer_state.json")).read_text())
    assert state["fingerprint"]["train"]["precision"] == "bf16"
    chip(False)
    with pytest.raises(StarbucksError, match="precision"):
        tiny_run(config, "train.precision=auto")


@pytest.mark.parametrize("native", [True, False])
def test_a_models_auto_precision_follows_the_chip(chip, native):
    """`StarbucksModel(precision="auto")` (encode, the suite, validation, mining) encodes as the
    precision `auto` resolves to."""
    from retrieval.encoder import StarbucksEncoder
    from transformers import AutoTokenizer
    from retrieval.checkpoint import resolve_model_path

    chip(native)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    encoder = StarbucksEncoder(tiny_bert(layers=2, hidden=32, vocab=tokenizer.vocab_size), "mean").eval()
    texts = ["a text editor for the terminal", "library for image decoding and encoding", "x"]

    def encode(precision):
        model = StarbucksModel(encoder, tokenizer, query_max_length=16, passage_max_length=32, precision=precision)
        return model.encode(texts)

    auto = encode("auto")
    assert np.array_equal(auto, encode("bf16" if native else "fp32"))
    assert not np.array_equal(encode("bf16"), encode("fp32"))  # bf16 autocast really runs on the CPU


# ---------------------------------------------------------------- bf16's quality


def _jsonl(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mini_slice():
    """50 debian-pkgs-mini dev queries, their relevant passages and 500 other passages (seeded)."""
    if not MINI.is_dir():
        pytest.skip("data/debian-pkgs-mini not built")
    rng = random.Random(0)
    qrels = {}
    for line in (MINI / "qrels" / "dev.tsv").read_text().splitlines()[1:]:
        qid, pid, score = line.split("\t")
        if int(score) > 0:
            qrels.setdefault(qid, set()).add(pid)
    qids = sorted(rng.sample(sorted(qrels), 50))
    queries = {q["_id"]: q["text"] for q in _jsonl(MINI / "queries.jsonl.gz")}
    corpus = {p["_id"]: p["text"] for p in _jsonl(MINI / "corpus.jsonl.gz")}
    relevant = sorted(set().union(*(qrels[q] for q in qids)))
    others = rng.sample(sorted(set(corpus) - set(relevant)), 500)
    return [queries[q] for q in qids], [corpus[p] for p in relevant + others]


def test_bf16_encoding_keeps_vectors_and_rankings_of_fp32(mini_slice):
    queries, passages = mini_slice
    sizes = sizes_of(load_config(None))
    out = {}
    for precision in ("fp32", "bf16"):
        model = StarbucksModel.from_pretrained(
            MINILM, "cpu", pooling="mean", normalize=True, sizes=sizes, passage_max_length=128, precision=precision
        )
        out[precision] = (
            model.embed_texts(queries, list(sizes), "query", batch_size=64),
            model.embed_texts(passages, list(sizes), "passage", batch_size=64),
        )
    lines = []
    for size in sizes:
        errors = []
        for side in (0, 1):
            ref = out["fp32"][side][size].astype(np.float64)
            got = out["bf16"][side][size].astype(np.float64)
            errors.append(np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1))
        errors = np.concatenate(errors)
        top = {p: np.argsort(-(q[size] @ d[size].T), axis=1, kind="stable")[:, :10] for p, (q, d) in out.items()}
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top["fp32"], top["bf16"])]))
        lines.append(
            f"{size.name:>8} {size.layers}x{size.dim}: vector error mean {errors.mean():.4f} "
            f"max {errors.max():.4f}, top-10 overlap {overlap:.3f}"
        )
        assert errors.max() <= VECTOR_TOLERANCE, lines[-1]
        assert overlap >= TOP10_FLOOR, lines[-1]
    print(
        "\nbf16 vs fp32, MiniLM, debian-pkgs-mini dev (50 queries, %d passages):\n%s"
        % (len(passages), "\n".join(lines))
    )


def tiny_run_config(tmp_path: Path, model_dir: Path) -> Path:
    """A tiny random BERT (MiniLM's tokenizer) trained by SRL on debian-pkgs-mini, logging every step."""
    from transformers import AutoTokenizer
    from retrieval.checkpoint import resolve_model_path

    if not MINI.is_dir():
        pytest.skip("data/debian-pkgs-mini not built")
    tiny_bert(layers=4, hidden=32, vocab=30522, seed=0).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(model_dir)
    cfg = {
        "name": "run",
        "output_dir": str(tmp_path / "run"),
        "model": {
            "name_or_path": str(model_dir),
            "pooling": "mean",
            "normalize": True,
            "query_max_length": 16,
            "passage_max_length": 48,
        },
        "sizes": ["1x8", "2x16", "4x32"],
        "data": {"corpus": str(MINI), "train": str(MINI / "train.jsonl.gz")},
        "train": {
            "batch_size": 8,
            "group_size": 3,
            "learning_rate": 2e-3,
            "max_steps": 2,
            "save_steps": 2,
            "logging_steps": 1,
            "temperature": 0.05,
            "warmup_ratio": 0.0,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tiny_run(config: Path, *overrides) -> Path:
    """Train in this process, in a fresh `AcceleratorState` (it keeps the first run's mixed precision)."""
    from accelerate.state import AcceleratorState
    from train.finetune import run_training

    cfg = load_config(config, list(overrides))
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        run_training(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Path(cfg.output_dir)


def test_bf16_training_steps_follow_fp32(tmp_path, monkeypatch):
    """The trainer's bf16 autocast (accelerate, CPU) gives the losses of fp32 within LOSS_TOLERANCE
    over a few SRL steps of a tiny model (and does run in bf16: the losses are not identical)."""
    from retrieval.encoder import StarbucksEncoder

    monkeypatch.setenv(CPU_BF16_ENV, "0")
    config = tiny_run_config(tmp_path, tmp_path / "tiny")
    embed, seen = StarbucksEncoder.forward, set()

    def spy(self, *args, **kwargs):
        seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)
        return embed(self, *args, **kwargs)

    monkeypatch.setattr(StarbucksEncoder, "forward", spy)
    losses = {}
    for precision in ("fp32", "bf16"):
        seen.clear()
        run_dir = tiny_run(
            config,
            f"train.precision={precision}",
            "train.max_steps=6",
            "train.save_steps=6",
            f"output_dir={tmp_path / precision}",
        )
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        losses[precision] = [r["loss"] for r in log if "loss" in r]
        assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
    fp32, bf16 = np.array(losses["fp32"]), np.array(losses["bf16"])
    print(
        f"\nSRL losses, tiny BERT: fp32 {np.round(fp32, 4).tolist()}\n                      "
        f"bf16 {np.round(bf16, 4).tolist()}"
    )
    assert len(fp32) == len(bf16) == 6
    assert not np.array_equal(fp32, bf16)
    assert np.all(np.abs(bf16 - fp32) <= LOSS_TOLERANCE * np.abs(fp32)), (fp32, bf16)
