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

import functools
import itertools
import json
from pathlib import Path

import torch

from retrieval.cost import TRAIN_SUMMARY
from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json

TRAINED = 3  # forward + backward (both operands' gradients) of a product whose inputs all need gradients
CHECKPOINT_FILE = "cost.json"
# what the experiment's dry run and the benchmarks' MFU may call
__all__ = ["estimate_training", "encoder_flops", "retrieval_step_flops"]


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
    raise StarbucksError(f"cannot count FLOPs of {type(config).__name__}: it names no feed-forward width "
                         f"(intermediate_size or hidden_dim)")


def encoder_flops(lengths: list[int], layers: int, config) -> int:
    """Forward FLOPs of the first `layers` layers of an HF encoder (`hidden_size`, its feed-forward width)."""
    return layers * layer_flops(lengths, int(config.hidden_size), intermediate_size(config))


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


SAMPLE_BATCHES = 8  # batches an estimate tokenises


@functools.lru_cache(maxsize=4)
def _groups(source: str, corpus: str, split: str, max_groups):
    from retrieval.data import load_train_groups

    return load_train_groups(source, corpus, split, max_groups)


def estimate_training(cfg) -> dict:
    """What a training run of `cfg` will cost, before it runs: `{steps, flops, flops_per_step}` on one
    process. Fine-tuning: the real collation of `SAMPLE_BATCHES` batches drawn as the run draws them;
    SMAE: full windows with the configured mask ratios, the window count from a sample of the texts' tokens."""
    import math

    from transformers import AutoConfig, AutoTokenizer

    from retrieval.config import sizes_of
    from retrieval.modeling import resolve_model_path

    t, m = cfg.train, cfg.model
    path = resolve_model_path(m.name_or_path)
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sizes = sizes_of(cfg)
    batch = int(t.batch_size) * int(t.grad_accum)
    if t.method == "smae":
        from train.pretrain import text_sources
        from train.masking import iter_texts

        p = cfg.pretrain
        stream = (text for s in text_sources(cfg)
                  for text in iter_texts(s["source"], s["text_field"], s["hf_config"], s["hf_split"]))
        texts = list(itertools.islice(stream, p.max_texts))  # no more of the sources than the run reads
        sample = texts[:: max(1, len(texts) // 2000)]
        per_text = sum(len(ids) - 1 for ids in tokenizer(sample, add_special_tokens=True)["input_ids"]) / len(sample)
        tokens = per_text * len(texts) if p.max_tokens is None else min(per_text * len(texts), p.max_tokens)
        windows = int(tokens // (int(p.max_length) - 2))
        length = int(p.max_length)
        ones = torch.ones(batch, length, dtype=torch.long)
        shape = {"attention_mask": ones}
        for key, ratio in (("labels", p.enc_mask_ratio), ("decoder_labels", p.dec_mask_ratio)):
            shape[key] = torch.where(torch.rand(batch, length) < ratio, ones, torch.full_like(ones, -100))
        deepest = min(sizes.largest.layers, int(config.num_hidden_layers))
        config.num_hidden_layers = deepest
        per_step = smae_step_flops(config, shape, sizes, int(p.decoder_layers))
        steps = t.max_steps or math.ceil(t.epochs * (windows // batch))
        from train.smae import ships_mlm_head

        warm = p.head_warmup_steps and not ships_mlm_head(m.name_or_path)  # a shipped head is not warmed up
        warmup = int(p.head_warmup_steps) * head_warmup_flops(config, shape) if warm else 0
        return {"steps": steps, "flops": steps * per_step + warmup, "flops_per_step": per_step, "windows": windows}
    from train.data import GroupCollator, GroupDataset
    from train.methods import plan_method

    plan = plan_method(t, sizes, int(config.num_hidden_layers), int(config.hidden_size), int(cfg.seed))
    groups = _groups(str(cfg.data.train), str(cfg.data.train_corpus or cfg.data.corpus), str(cfg.data.train_split),
                     cfg.data.max_train_groups)
    dataset = GroupDataset(groups, int(t.group_size), int(cfg.seed))
    collate = GroupCollator(tokenizer, m.query_max_length, m.passage_max_length, m.query_prefix, m.passage_prefix)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(cfg.seed))).tolist()
    if len(dataset) < batch:
        raise StarbucksError(f"{len(dataset)} training groups make no full step of {batch} (batch_size x grad_accum); "
                             f"lower train.batch_size or add data")
    sampled = []
    for i in range(min(SAMPLE_BATCHES, len(dataset) // batch)):
        b = collate([dataset[(k, 0)] for k in order[i * batch:(i + 1) * batch]])
        sampled.append(retrieval_step_flops(config, b["queries"]["attention_mask"], b["passages"]["attention_mask"],
                                            plan.schedule.at(i)))
    per_step = int(sum(sampled) / len(sampled))
    steps = t.max_steps or max(1, math.ceil(t.epochs * (len(groups) // batch)))
    return {"steps": steps, "flops": steps * per_step, "flops_per_step": per_step}


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
