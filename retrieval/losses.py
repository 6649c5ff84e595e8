"""Contrastive losses over sub-size embeddings, composable like sentence-transformers' `MatryoshkaLoss`.

`InfoNCE` scores a batch of queries against a flat batch of passage groups (the positive of
query `i` at column `i * group_size`; every other column, hard or in-batch, is a negative).
`StarbucksLoss` wraps a base loss: for each visited size `(n, d)` it scores
`q[size] @ p[size].T` (each size its own `(B, B*g)` product, never a 4-D broadcast) and adds
`kl_weight * KL(P_teacher || P_size)`, the teacher being the largest visited size with its
scores detached (a stop-gradient teacher). Which sizes are visited is the caller's choice:
all of the size list (SRL), four sampled ones (2DMSE) or a single one (separate, full).

Under DDP, `gather` (see `CrossDeviceGather`) makes the scores span the passages of every
device (cross-device negatives); the loss to backpropagate is then scaled by the world size so
that DDP's gradient averaging gives the gradient of the loss on the combined batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.errors import StarbucksError
from retrieval.sizes import Size

REDUCTIONS = ("mean", "sum")


@dataclass
class LossOutput:
    """`loss` is what to backpropagate; `terms` are detached values for logging (`loss`, `ce/<size>`, `kl/<size>`)."""

    loss: Tensor
    terms: dict[str, Tensor]


class InfoNCE(nn.Module):
    """Cross-entropy of each query's positive against all passages of the batch."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise StarbucksError(f"train.temperature = {temperature} must be > 0")
        self.temperature = float(temperature)

    def logits(self, q: Tensor, p: Tensor) -> Tensor:
        """`(B, P)` scores divided by the temperature, in at least fp32 (also under autocast)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            return q.to(dtype) @ p.to(dtype).T / self.temperature

    def forward(self, logits: Tensor) -> Tensor:
        queries, passages = logits.shape
        if passages % queries:
            raise ValueError(f"{passages} passages do not split into groups for {queries} queries")
        target = torch.arange(queries, device=logits.device) * (passages // queries)
        return F.cross_entropy(logits, target)


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """`KL(P_teacher || P_student)` of row softmaxes at `temperature`, mean over rows; no gradient to the teacher."""
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")


class StarbucksLoss(nn.Module):
    """Base loss on every visited size plus KL alignment of each size to the largest (detached).

    total = reduce over sizes s of `w_s * (base(s) + kl_weight * KL(P_teacher || P_s))`, where
    `reduce` is the mean (SRL, the paper's formula) or the sum (2DMSE); `w_s` comes from
    `size_weights` (default 1). The teacher's own KL term is zero and is not computed.
    """

    def __init__(
        self,
        base: InfoNCE,
        sizes: Sequence[Size],
        kl_weight: float = 1.0,
        kl_temperature: float = 1.0,
        size_weights: Sequence[float] | None = None,
        reduction: str = "mean",
        gather: "CrossDeviceGather | None" = None,
    ):
        super().__init__()
        self.base = base
        self.sizes = list(sizes)
        if not self.sizes:
            raise StarbucksError("the loss needs at least one size")
        if size_weights is not None and len(size_weights) != len(self.sizes):
            raise StarbucksError(
                f"train.size_weights has {len(size_weights)} entries but there are {len(self.sizes)} sizes; "
                "give one weight per size"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}")
        if not kl_temperature > 0:
            raise StarbucksError(f"train.kl_temperature = {kl_temperature} must be > 0")
        weights = size_weights if size_weights is not None else [1.0] * len(self.sizes)
        self.weights = {s: float(w) for s, w in zip(self.sizes, weights)}
        self.kl_weight = float(kl_weight)
        self.kl_temperature = float(kl_temperature)
        self.reduction = reduction
        self.gather = gather

    def forward(
        self, q: Mapping[Size, Tensor], p: Mapping[Size, Tensor], sizes: Sequence[Size] | None = None
    ) -> LossOutput:
        sizes = self.sizes if sizes is None else list(sizes)
        teacher = max(sizes, key=lambda s: (s.layers, s.dim))
        if self.gather is not None:
            q = {s: self.gather(q[s]) for s in sizes}
            p = {s: self.gather(p[s]) for s in sizes}
        logits = {s: self.base.logits(q[s], p[s]) for s in sizes}
        terms: dict[str, Tensor] = {}
        total = logits[teacher].new_zeros(())
        for s in sizes:
            term = self.base(logits[s])
            terms[f"ce/{s.name}"] = term.detach()
            if self.kl_weight and s != teacher:
                kl = kl_divergence(logits[teacher], logits[s], self.kl_temperature)
                terms[f"kl/{s.name}"] = kl.detach()
                term = term + self.kl_weight * kl
            total = total + self.weights.get(s, 1.0) * term
        if self.reduction == "mean":
            total = total / len(sizes)
        terms["loss"] = total.detach()
        scale = self.gather.world_size if self.gather is not None else 1
        return LossOutput(total * scale, terms)


class CrossDeviceGather:
    """All-gather along dim 0 across the process group, keeping this rank's slice differentiable.

    Every rank then computes the same loss on the combined batch; only its own slice carries
    gradient, so DDP's averaging of the per-rank gradients needs the loss scaled by the world size.
    """

    def __init__(self, world_size: int, rank: int):
        self.world_size = int(world_size)
        self.rank = int(rank)

    def __call__(self, t: Tensor) -> Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t.detach())
        parts[self.rank] = t
        return torch.cat(parts, dim=0)
