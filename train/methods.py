"""Training methods: which sizes the loss visits at each step, and what the trained model is.

- `srl`: every size of the list, every step (mean of the terms; the paper's SRL).
- `2dmse`: per step, `n ~ U(1, N-1)` and `d ~ U(1, D-1)` (`train.twodmse_dims: uniform`, the
  paper's Eq. 3) or `d` from the list's dims below `D` (`list`, as sentence-transformers'
  `Matryoshka2dLoss`); the loss visits `(n, d), (n, D), (N, d), (N, D)` and sums the terms
  (2DMSE). `(N, D)` is the largest size.
- `separate`: one size `train.size`; the model is truncated to its `n` layers.
- `full`: the last layer, full width only (a plain dense retriever).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from retrieval.errors import StarbucksError
from retrieval.sizes import Size, SizeList, check_size, parse_size

METHODS = ("srl", "2dmse", "separate", "full")
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


@dataclass
class MethodPlan:
    """What a method trains: sizes per step, how terms combine, the model's depth and recorded sizes."""

    name: str
    schedule: FixedSizes | TwoDMSESizes
    reduction: str  # mean | sum
    saved_sizes: SizeList  # the sizes written to the model's starbucks.json
    truncate_to: int | None = None  # keep only this many layers (separate)


def plan_method(train_cfg, sizes: SizeList, num_layers: int, hidden: int, seed: int,
                model_name: str = "the model") -> MethodPlan:
    """Validate the method's settings against the size list and the model; raise one clear line."""
    method = str(train_cfg.method)
    if method not in METHODS:
        raise StarbucksError(f"train.method = {method!r} is not one of {', '.join(METHODS)}")
    if train_cfg.get("size_weights") is not None and method != "srl":
        raise StarbucksError(f"train.size_weights applies to method srl only; remove it for method {method}")
    if method != "separate" and train_cfg.get("size") is not None:
        raise StarbucksError("train.size is for method separate; remove it or set train.method=separate")
    sizes.validate(num_layers, hidden, model_name)
    # Layers above the deepest size would get no gradient (and stall DDP): they are dropped.
    deepest = sizes.largest.layers if sizes.largest.layers < num_layers else None
    if method == "srl":
        return MethodPlan(method, FixedSizes(sizes), "mean", sizes, truncate_to=deepest)
    if method == "2dmse":
        schedule = TwoDMSESizes(sizes, seed, str(train_cfg.get("twodmse_dims", "uniform")))
        return MethodPlan(method, schedule, "sum", sizes, truncate_to=deepest)
    if method == "separate":
        if train_cfg.get("size") is None:
            raise StarbucksError(
                f"method separate trains one size: set train.size to one of {', '.join(sizes.names)} or LxD"
            )
        size = sizes.get(str(train_cfg.size))
        check_size(size, num_layers, hidden, model_name)
        return MethodPlan(method, FixedSizes([size]), "mean", SizeList([size]), truncate_to=size.layers)
    full = next((s for s in sizes if (s.layers, s.dim) == (num_layers, hidden)), Size("full", num_layers, hidden))
    return MethodPlan(method, FixedSizes([full]), "mean", sizes)
