"""Shared fixtures: the repo root, the shared MS MARCO topics/qrels, tiny random BERT models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
