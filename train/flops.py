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

`RunCost` is what a run records: wall time, device, steps and FLOPs, carried over a resume
through the checkpoint (`cost.json`) and written next to the model as `train_summary.json`
(format: `retrieval.cost`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from retrieval.cost import TRAIN_SUMMARY
from retrieval.io import atomic_write_json

TRAINED = 3  # forward + backward (both operands' gradients) of a product whose inputs all need gradients
CHECKPOINT_FILE = "cost.json"


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


def encoder_flops(lengths: list[int], layers: int, config) -> int:
    """Forward FLOPs of the first `layers` layers of an HF encoder (`hidden_size`, `intermediate_size`)."""
    return layers * layer_flops(lengths, int(config.hidden_size), int(config.intermediate_size))


def retrieval_step_flops(config, query_mask: torch.Tensor, passage_mask: torch.Tensor, sizes, world: int = 1) -> int:
    """Forward + backward FLOPs of one fine-tuning micro-batch on one rank: queries and passages
    through the layers of the deepest visited size, and each size's `(Q x P)` score matrix
    (`world` x each side under cross-device negatives, where every rank scores the gathered batch)."""
    depth = max(s.layers for s in sizes)
    encode = encoder_flops(lengths_of(query_mask), depth, config) + encoder_flops(lengths_of(passage_mask), depth,
                                                                                 config)
    queries, passages = world * len(query_mask), world * len(passage_mask)
    scores = sum(matmul(queries, s.dim, passages) for s in sizes)
    return TRAINED * (encode + scores)


def smae_step_flops(config, batch: dict, sizes, decoder_layers: int) -> int:
    """Forward + backward FLOPs of one SMAE micro-batch (`train.smae`): the encoder to the deepest size;
    per size the bottleneck's projection `W_{1:d}`, the decoder layers over the decoder input, and the
    MLM head (projection from `d`, resp. the full width, then the vocabulary) at the labelled positions."""
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    lengths = lengths_of(batch["attention_mask"])
    enc_labels = int((batch["labels"] != -100).sum())
    dec_labels = int((batch["decoder_labels"] != -100).sum())
    total = encoder_flops(lengths, max(s.layers for s in sizes), config)
    for s in sizes:
        total += matmul(len(lengths), s.dim, hidden)  # bottleneck projection
        total += decoder_layers * layer_flops(lengths, hidden, int(config.intermediate_size))
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


class RunCost:
    """Wall time, steps and FLOPs of a run, summed over the ranks and over resumed invocations."""

    def __init__(self, accelerator, checkpoint: Path | None):
        self.accelerator = accelerator
        before = {}
        if checkpoint is not None and (checkpoint / CHECKPOINT_FILE).is_file():
            before = json.loads((checkpoint / CHECKPOINT_FILE).read_text())
        self.seconds_before = float(before.get("seconds", 0.0))
        self.flops_before = int(before.get("flops", 0))
        self.local_flops = 0  # this rank, this invocation

    def add(self, flops: int) -> None:
        self.local_flops += int(flops)

    def record(self, step: int, seconds: float) -> dict:
        """The totals so far, `seconds` of this invocation's loop included (a collective call under
        DDP: every rank must call it)."""
        local = torch.tensor([self.local_flops], dtype=torch.float64, device=self.accelerator.device)
        flops = self.accelerator.reduce(local, "sum") if self.accelerator.num_processes > 1 else local
        device = self.accelerator.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return {"steps": step, "seconds": round(self.seconds_before + seconds, 3),
                "flops": self.flops_before + int(flops.item()), "device": name,
                "processes": self.accelerator.num_processes}

    def save(self, directory: Path, record: dict) -> None:
        """Into a checkpoint being staged (main process)."""
        atomic_write_json(directory / CHECKPOINT_FILE, record)

    def write_summary(self, run_dir: Path, record: dict, **extra) -> None:
        """`train_summary.json` next to the model (main process)."""
        atomic_write_json(run_dir / TRAIN_SUMMARY, {**record, **extra})
