"""Training methods: which sizes the loss visits at each step, and what the trained model is.

- `srl`: every size of the list, every step (mean of the terms; the paper's SRL).
- `2dmse`: per step, `n ~ U(1, N-1)` and `d ~ U(1, D-1)` (`train.twodmse_dims: uniform`, the
  paper's Eq. 3) or `d` from the list's dims below `D` (`list`, as sentence-transformers'
  `Matryoshka2dLoss`); the loss visits `(n, d), (n, D), (N, d), (N, D)` and sums the terms
  (2DMSE). `(N, D)` is the largest size.
- `separate`: one size `train.size`; the model is truncated to its `n` layers.
- `full`: the last layer, full width only (a plain dense retriever).
- `srl-depth` / `srl-width`: SRL over the 1D Starbucks sizes of the list (the paper's v3 variants,
  read from its abstract: docs/training.md): `srl-depth` every layer count of the list at the full
  width `(n, D)`, `srl-width` every dim of the list at the full depth `(N, d)`. The model records
  those sizes (named as the list names them, else `LxD`).
"""

from __future__ import annotations

from dataclasses import dataclass

from retrieval.errors import StarbucksError
from retrieval.samplers import FINETUNE_METHODS, FixedSizes, TwoDMSESizes
from retrieval.sizes import Size, SizeList, check_size, parse_size

METHODS = FINETUNE_METHODS  # train.method's fine-tuning values (retrieval.schema checks the key)
SRL_METHODS = ("srl", "srl-depth", "srl-width")  # SRL's loss (mean, size_weights) over their own size lists


def one_dimensional(sizes: SizeList, axis: str) -> SizeList:
    """The 1D Starbucks sizes of a list: `depth`, each of its layer counts at the largest size's dim;
    `width`, each of its dims at the largest size's layers. A configured size keeps its name."""
    full = sizes.largest
    if axis == "depth":
        wanted = [(n, full.dim) for n in sorted({s.layers for s in sizes})]
    else:
        wanted = [(full.layers, d) for d in sorted({s.dim for s in sizes})]
    return SizeList(parse_size(f"{n}x{d}", sizes) for n, d in wanted)


@dataclass
class MethodPlan:
    """What a method trains: sizes per step, how terms combine, the model's depth and recorded sizes."""

    name: str
    schedule: FixedSizes | TwoDMSESizes
    reduction: str  # mean | sum
    saved_sizes: SizeList  # the sizes written to the model's starbucks.json
    truncate_to: int | None = None  # keep only this many layers (separate)


def plan_method(
    train_cfg, sizes: SizeList, num_layers: int, hidden: int, seed: int, model_name: str = "the model"
) -> MethodPlan:
    """Validate the method's settings against the size list and the model; raise one clear line.
    `train_cfg` is a loaded config's `train` section: the schema gave every key its default and checked
    its type and range (`train.method` is one of METHODS or smae); what is left needs two keys or the model."""
    method = str(train_cfg.method)
    if train_cfg.size_weights is not None and method not in SRL_METHODS:
        raise StarbucksError(
            f"train.size_weights applies to method srl (and srl-depth, srl-width) only; remove it for method {method}"
        )
    if method != "separate" and train_cfg.size is not None:
        raise StarbucksError("train.size is for method separate; remove it or set train.method=separate")
    sizes.validate(num_layers, hidden, model_name)
    # Layers above the deepest size would get no gradient (and stall DDP): they are dropped.
    deepest = sizes.largest.layers if sizes.largest.layers < num_layers else None
    if method == "srl":
        return MethodPlan(method, FixedSizes(sizes), "mean", sizes, truncate_to=deepest)
    if method in ("srl-depth", "srl-width"):
        visited = one_dimensional(sizes, method.split("-")[1])
        return MethodPlan(method, FixedSizes(visited), "mean", visited, truncate_to=deepest)
    if method == "2dmse":
        schedule = TwoDMSESizes(sizes, seed, str(train_cfg.twodmse_dims))
        return MethodPlan(method, schedule, "sum", sizes, truncate_to=deepest)
    if method == "separate":
        if train_cfg.size is None:
            raise StarbucksError(
                f"method separate trains one size: set train.size to one of {', '.join(sizes.names)} or LxD"
            )
        size = sizes.get(str(train_cfg.size))
        check_size(size, num_layers, hidden, model_name)
        return MethodPlan(method, FixedSizes([size]), "mean", SizeList([size]), truncate_to=size.layers)
    full = next((s for s in sizes if (s.layers, s.dim) == (num_layers, hidden)), Size("full", num_layers, hidden))
    return MethodPlan(method, FixedSizes([full]), "mean", sizes)
