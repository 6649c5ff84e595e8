"""The plain-`transformers` reference the benchmarks measure the toolkit against: what a user writes
(and what Tevatron and the paper's code do) without this toolkit.

- encoding: `BertModel` under autocast, batches in the given order padded to the longest sequence
  (a multiple of 16), CLS pooling, one full forward (`output_hidden_states`) per wanted size;
- an SRL training step: one forward of queries and passages with every hidden state, per size the
  CLS vector cut to its dims, InfoNCE + KL to the largest size, `torch.optim.AdamW` (default, not
  fused), bf16 autocast;
- search: one dense matmul of a query batch with every vector, then `torch.topk` over all scores.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict:
    batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    extra = -batch["input_ids"].shape[1] % 16  # the tokenizer refuses a multiple that does not divide max_length
    return {
        k: F.pad(v, (0, extra), value=tokenizer.pad_token_id if k == "input_ids" else 0).to(device)
        for k, v in batch.items()
    }


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def encode(
    model,
    tokenizer,
    texts: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    batch_size: int,
    max_length: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[tuple[int, int], torch.Tensor]:
    """CLS embeddings per `(layers, dim)`: a full forward pass over the texts for each size."""
    out = {}
    for layers, dim in sizes:
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
            with autocast(device, dtype):
                hidden = model(**batch, output_hidden_states=True).hidden_states
            parts.append(hidden[layers][:, 0, :dim].float())
        out[(layers, dim)] = torch.cat(parts)
    return out


def srl_loss(q_states, p_states, sizes: Sequence[tuple[int, int]], group: int, temperature: float) -> torch.Tensor:
    """Mean over sizes of InfoNCE (in-batch + hard negatives) + KL(largest || size), CLS pooling."""
    labels = torch.arange(q_states[0].shape[0], device=q_states[0].device) * group
    logits = {}
    for layers, dim in sizes:
        q = q_states[layers][:, 0, :dim].float()
        p = p_states[layers][:, 0, :dim].float()
        logits[(layers, dim)] = q @ p.T / temperature
    teacher = F.softmax(logits[sizes[-1]].detach(), dim=1)
    total = 0.0
    for size in sizes:
        total = total + F.cross_entropy(logits[size], labels)
        total = total + F.kl_div(F.log_softmax(logits[size], dim=1), teacher, reduction="batchmean")
    return total / len(sizes)


def train_step(
    model,
    optimizer,
    queries: dict,
    passages: dict,
    sizes,
    group: int,
    device: torch.device,
    dtype: torch.dtype | None,
    temperature: float = 1.0,
) -> float:
    with autocast(device, dtype):
        q = model(**queries, output_hidden_states=True).hidden_states
        p = model(**passages, output_hidden_states=True).hidden_states
        loss = srl_loss(q, p, sizes, group, temperature)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


@torch.inference_mode()
def search(queries: torch.Tensor, vectors: torch.Tensor, k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` (scores, rows) per query: a matmul per query batch, then `torch.topk` over all scores."""
    values, rows = [], []
    for start in range(0, len(queries), batch_size):
        top = torch.topk(queries[start : start + batch_size] @ vectors.T, k, dim=1)
        values.append(top.values)
        rows.append(top.indices)
    return torch.cat(values), torch.cat(rows)
