"""Model FLOPs of training steps, counted from the real tokens, and the cost record of a run.

What is counted: the multiply-adds of the matrix products (2 FLOPs each), which is what MFU
counts; layer norms, softmax, activations and embedding look-ups are left out. Per sequence of
`L` real (unpadded) tokens, one BERT-style layer of width `H` and feed-forward width `I` costs

    2 L (4 H^2 + 2 H I)      Q, K, V, output and the two feed-forward projections
  + 4 L^2 H                  attention scores and their weighted sum

forward, and twice that backward (the gradients of both operands of every product), so a
trained product costs 3x its forward. Only the layers a step actually runs count (early exit:
a step whose deepest size has `n` layers runs `n`). Padding is not counted, so the count does
not depend on how a batch is padded or cut into length buckets.

The formulas only: a run's cost record is `train.cost`, the estimate before a run `train.estimate`.
"""

from __future__ import annotations

import torch

from retrieval.errors import StarbucksError

TRAINED = 3  # forward + backward (both operands' gradients) of a product whose inputs all need gradients
__all__ = ["encoder_flops", "retrieval_step_flops"]  # what the benchmarks' MFU may call


def matmul(rows: int, inner: int, cols: int, factor: int = 1) -> int:
    """FLOPs of `factor` passes of a `(rows x inner) @ (inner x cols)` product."""
    return 2 * rows * inner * cols * factor


def lengths_of(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row of a batch."""
    return [int(n) for n in attention_mask.sum(1).tolist()]


def layer_flops(lengths: list[int], hidden: int, intermediate: int) -> int:
    """Forward FLOPs of one transformer layer over sequences of these real lengths."""
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    return 2 * tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * squares * hidden


def intermediate_size(config) -> int:
    """The feed-forward width of an HF encoder config (`intermediate_size`; DistilBERT's `hidden_dim`)."""
    for name in ("intermediate_size", "hidden_dim"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise StarbucksError(
        f"cannot count FLOPs of {type(config).__name__}: it names no feed-forward width "
        f"(intermediate_size or hidden_dim)"
    )


def encoder_flops(lengths: list[int], layers: int, config) -> int:
    """Forward FLOPs of the first `layers` layers of an HF encoder (`hidden_size`, its feed-forward width)."""
    return layers * layer_flops(lengths, int(config.hidden_size), intermediate_size(config))


def retrieval_step_flops(config, query_mask: torch.Tensor, passage_mask: torch.Tensor, sizes, world: int = 1) -> int:
    """Forward + backward FLOPs of one fine-tuning micro-batch on one rank: queries and passages
    through the layers of the deepest visited size, and each size's `(Q x P)` score matrix
    (`world` x each side under cross-device negatives, where every rank scores the gathered batch)."""
    depth = max(s.layers for s in sizes)
    encode = encoder_flops(lengths_of(query_mask), depth, config) + encoder_flops(
        lengths_of(passage_mask), depth, config
    )
    queries, passages = world * len(query_mask), world * len(passage_mask)
    scores = sum(matmul(queries, s.dim, passages) for s in sizes)
    return TRAINED * (encode + scores)


def smae_step_flops(config, batch: dict, sizes, decoder_layers: int) -> int:
    """Forward + backward FLOPs of one SMAE micro-batch (`train.smae`): the encoder to the deepest size;
    per size the bottleneck, i.e. the MLM head's transform cut to `d` (the dense layer's first `d` input
    columns, a `d -> H` product; its activation and LayerNorm are elementwise and not counted), the
    decoder layers over the decoder input, and the MLM head (its transform from `d`, resp. the full
    width, then the vocabulary) at the labelled positions."""
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    lengths = lengths_of(batch["attention_mask"])
    enc_labels = int((batch["labels"] != -100).sum())
    dec_labels = int((batch["decoder_labels"] != -100).sum())
    total = encoder_flops(lengths, max(s.layers for s in sizes), config)
    for s in sizes:
        total += matmul(len(lengths), s.dim, hidden)  # bottleneck: the cut transform's dense slice
        total += decoder_layers * layer_flops(lengths, hidden, intermediate_size(config))
        total += matmul(enc_labels, s.dim, hidden) + matmul(enc_labels, hidden, vocab)
        total += matmul(dec_labels, hidden, hidden) + matmul(dec_labels, hidden, vocab)
    return TRAINED * total


def head_warmup_flops(config, batch: dict) -> int:
    """FLOPs of one head warm-up micro-batch: the frozen encoder forward only; the head's two products
    at the labelled positions forward and one gradient each (the dense layer's weight, whose input
    needs none; the tied vocabulary projection's input, whose weight is frozen)."""
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    labels = int((batch["labels"] != -100).sum())
    encoder = encoder_flops(lengths_of(batch["attention_mask"]), int(config.num_hidden_layers), config)
    return encoder + 2 * (matmul(labels, hidden, hidden) + matmul(labels, hidden, vocab))
