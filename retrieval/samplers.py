"""Which sizes a training step visits: every size (`FixedSizes`: SRL, separate, full) or 2DMSE's
per-step sample (`TwoDMSESizes`). One sampler for the toolkit's trainer (`train.methods`) and the
sentence-transformers loss (`retrieval.st_loss`)."""

from __future__ import annotations

import random
from typing import Sequence

from retrieval.errors import StarbucksError
from retrieval.sizes import Size, SizeList, parse_size

# train.method of fine-tuning (train.methods plans each; `smae` is pre-training's): listed once, here
FINETUNE_METHODS = ("srl", "2dmse", "separate", "full", "srl-depth", "srl-width")
TWODMSE_DIMS = ("uniform", "list")  # train.twodmse_dims


class FixedSizes:
    """The same sizes at every step."""

    def __init__(self, sizes: Sequence[Size]):
        self.sizes = list(sizes)

    def at(self, step: int) -> list[Size]:
        return self.sizes


class TwoDMSESizes:
    """2DMSE's per-step sample: one layer below N, one dim below D, crossed with (N, D).

    `dims = "uniform"`: `d ~ U(1, D-1)` (the paper); `"list"`: `d` from the size list's dims below `D`.
    The sample depends only on `(seed, step)`, so every rank and a resumed run draw the same sizes.
    """

    def __init__(self, sizes: SizeList, seed: int, dims: str = "uniform"):
        if dims not in TWODMSE_DIMS:
            raise StarbucksError(f"train.twodmse_dims = {dims!r} is not one of {', '.join(TWODMSE_DIMS)}")
        self.known = list(sizes)
        self.full = sizes.largest
        if dims == "uniform":
            self.dims = list(range(1, self.full.dim))
        else:
            self.dims = sorted({s.dim for s in sizes if s.dim < self.full.dim})
        self.seed = seed
        if self.full.layers < 2 or not self.dims:
            raise StarbucksError(
                f"method 2dmse needs a largest size with >= 2 layers and at least one smaller dim; "
                f"the largest is {self.full} and the dims are {sorted({s.dim for s in sizes})}"
                + (" (train.twodmse_dims=list takes them from `sizes`)" if dims == "list" else "")
            )

    def at(self, step: int) -> list[Size]:
        rng = random.Random(f"{self.seed}:2dmse:{step}")
        n = rng.randint(1, self.full.layers - 1)
        d = rng.choice(self.dims)
        grid = [(n, d), (n, self.full.dim), (self.full.layers, d), (self.full.layers, self.full.dim)]
        return [parse_size(f"{layers}x{dim}", self.known) for layers, dim in grid]
