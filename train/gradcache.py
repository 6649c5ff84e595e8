"""Gradient caching (GradCache, Gao et al. 2021) for every method: a big contrastive batch in the
activation memory of one chunk.

The loss couples every query with every passage of the batch (and, under DDP, of every device),
so the batch cannot be cut into independent micro-batches; but texts -> embeddings is row-wise
and holds nearly all the activation memory, while embeddings -> loss is small. So a step
1. embeds every chunk of `chunk` texts without gradients, at all the sizes the step visits
   (one pass to the deepest layer), recording the RNG state before each chunk;
2. computes the loss once on the whole batch's embeddings (in-batch and cross-device negatives,
   KL alignment) and back-propagates it to those embeddings only;
3. re-runs each chunk with gradients from its recorded RNG state (the same dropout masks) and
   back-propagates the chunk's cached embedding gradients, all sizes at once.
The parameters' gradients are those of one differentiable pass over the same chunks: with one
chunk per input, exactly the uncached step's. Under DDP only the step's very last re-run
synchronises (`no_sync` on the others); under fp16 the loss scaler's factor rides on the cached
gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from retrieval.losses import LossOutput
from retrieval.sizes import Size

__all__ = ["cached_backward"]  # the piece bench/grad_cache.py measures on its own

Embeddings = dict[str, dict[Size, Tensor]]  # input name ("queries", "passages") -> size -> (rows, dim)


def rng_state(device: torch.device) -> dict:
    """The RNG states dropout draws from: the CPU generator and, on a GPU, that device's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def split_rows(batch: Mapping[str, Tensor], chunk: int) -> list[dict[str, Tensor]]:
    """Consecutive slices of at most `chunk` rows of every tensor of a tokenised batch."""
    rows = len(batch["input_ids"])
    return [{k: v[start : start + chunk] for k, v in batch.items()} for start in range(0, rows, chunk)]


def cached_backward(
    accelerator: Accelerator,
    model: nn.Module,
    inputs: Mapping[str, Mapping[str, Tensor]],
    sizes: Sequence[Size],
    loss_fn: Callable[[Embeddings], LossOutput],
    chunk: int,
    scale: float = 1.0,
    sync: bool = True,
) -> LossOutput:
    """Back-propagate `loss_fn(model's embeddings of inputs) * scale` chunk by chunk; the loss's output.

    `model(batch, sizes)` gives `{size: embeddings}`; `sync=False` keeps DDP from reducing the
    gradients (all but a step's last micro-batch)."""
    device = accelerator.device
    pieces = [(name, part) for name, batch in inputs.items() for part in split_rows(batch, chunk)]
    states, parts = [], {name: [] for name in inputs}
    with torch.no_grad():
        for name, part in pieces:
            states.append(rng_state(device))
            with accelerator.autocast():
                parts[name].append(model(part, sizes))
    after = rng_state(device)
    leaves = {
        name: {s: torch.cat([p[s] for p in chunks]).requires_grad_() for s in sizes} for name, chunks in parts.items()
    }
    with accelerator.autocast():
        out = loss_fn(leaves)
    accelerator.backward(out.loss * scale)

    start = dict.fromkeys(inputs, 0)
    for i, ((name, part), state) in enumerate(zip(pieces, states)):
        rows = slice(start[name], start[name] + len(part["input_ids"]))
        start[name] = rows.stop
        last = sync and i == len(pieces) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            set_rng_state(state, device)
            with accelerator.autocast():
                embedded = model(part, sizes)
            torch.autograd.backward([embedded[s] for s in sizes], [leaves[name][s].grad[rows] for s in sizes])
    set_rng_state(after, device)  # as after the uncached forward pass
    return out
