"""Training batches: a seeded per-epoch order, query groups, tokenised collation.

The sampler yields `(index, epoch)` pairs, so an item may depend on the epoch (which hard
negatives a group shows) without any state in the dataset; a step's data is a pure function
of `(seed, epoch, position)`, which is what makes resuming exact.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from retrieval.data import TrainGroup, sample_negatives
from retrieval.encoder import tokenize
from retrieval.seeds import derive_seed


class EpochSampler(Sampler):
    """A seeded permutation of `range(n)` per epoch, yielding `(index, epoch)`."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        epoch = self.epoch
        return iter([(i, epoch) for i in torch.randperm(self.n, generator=generator).tolist()])

    def __len__(self) -> int:
        return self.n


class GroupDataset(Dataset):
    """Item `(i, epoch)`: query `i` and its group (positive first, then `group_size - 1` hard negatives)."""

    def __init__(self, groups: Sequence[TrainGroup], group_size: int, seed: int):
        self.groups = groups
        self.group_size = group_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: tuple[int, int]) -> tuple[str, list[str]]:
        index, epoch = key
        group = self.groups[index]
        positive = group.positives[epoch % len(group.positives)]
        return group.query, [positive] + sample_negatives(group, self.group_size - 1, epoch, self.seed)


class GroupCollator:
    """Tokenise a list of `(query, passages)` items into `{"queries": ..., "passages": ...}` (dynamic padding)."""

    def __init__(
        self,
        tokenizer,
        query_max_length: int,
        passage_max_length: int,
        query_prefix: str = "",
        passage_prefix: str = "",
    ):
        self.tokenizer = tokenizer
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix

    def __call__(self, items: Sequence[tuple[str, list[str]]]) -> dict:
        queries = [q for q, _ in items]
        passages = [p for _, group in items for p in group]
        return {
            "queries": dict(tokenize(self.tokenizer, queries, self.query_max_length, self.query_prefix)),
            "passages": dict(tokenize(self.tokenizer, passages, self.passage_max_length, self.passage_prefix)),
        }
