"""`python -m train.pretrain --config configs/smae.yaml`: SMAE pre-training (paper section 3.2).

`run_pretraining(cfg)` packs the `pretrain.text` source into fixed-length windows (once, cached
under `pretrain.windows_dir`), builds the SMAE model (`train.smae`) from
`model.name_or_path` with the bottleneck pooled as `model.pooling` and trains it with the
shared loop (`train.trainer.fit`: bf16 on GPU, checkpoints, resume, progress, per-size
`enc/<size>` and `dec/<size>` loss logging). The encoder alone is written to
`<output_dir>/model`, ready as `model.name_or_path` of fine-tuning.

`pretrain.text: train-data` is the training collection: every passage of `data.train_corpus`
(else `data.corpus`) and every query of `data.train`. A new MLM head (a backbone that ships
none) is first warmed up for `pretrain.head_warmup_steps` with the encoder frozen (its own run
under `<output_dir>/head-warmup`, resumable like any other); the MLM loss of a fixed set of
windows before and after goes to the log and the encoder's `starbucks.json`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from retrieval.cli import parse_stage_args, stage_parser
from retrieval.checkpoint import model_shape
from retrieval.config import experiment_paths, sizes_of
from retrieval.errors import cli_entry
from safetensors.torch import save_file
from torch import nn

from train.flops import head_warmup_flops, smae_step_flops
from train.masking import SMAECollator, WindowDataset, build_windows, iter_texts
from train.smae import SMAE
from train.trainer import TrainResult, TrainSettings, config_fingerprint, distributed_state, fit

SMAE_CONFIG = "configs/smae.yaml"  # the default config of `python -m train.pretrain`
TRAIN_DATA = "train-data"  # pretrain.text: the training collection's passages and queries
PROBE_WINDOWS = 64  # windows whose MLM loss is reported before and after the head warm-up
WARMUP_DIR = "head-warmup"


class SMAETask:
    """Packed text windows -> two maskings -> the SMAE loss; saves the encoder only."""

    name = "smae"
    examples_name = "windows"
    can_validate = False
    can_cache_gradients = False

    def __init__(
        self,
        model: SMAE,
        tokenizer,
        dataset: WindowDataset,
        collate: SMAECollator,
        cfg,
        head_from_checkpoint: bool,
        warmup: dict | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.collate = collate
        config = OmegaConf.to_container(cfg, resolve=True)
        self.meta = {
            "base_model": cfg.model.name_or_path,
            "mlm_head": "checkpoint" if head_from_checkpoint else "new",
            "windows": len(dataset),
            "bottleneck_pooling": model.encoder.pooling,
            "config": config,
        }
        if warmup:
            self.meta["head_warmup"] = warmup
        self._fingerprint = config_fingerprint(cfg, pretrain=config["pretrain"])

    def compute_loss(self, model, batch: dict, step: int):
        return model(batch)

    def batch_examples(self, batch: dict) -> int:
        return len(batch["input_ids"])

    def step_flops(self, batch: dict, step: int) -> int:
        return smae_step_flops(self.model.encoder.config, batch, self.model.sizes, len(self.model.decoder))

    def save_model(self, model: SMAE, directory: Path, step: int) -> None:
        model.save_encoder(directory, self.tokenizer, {**self.meta, "step": step})

    def fingerprint(self) -> dict:
        return self._fingerprint


class HeadWarmup(nn.Module):
    """SMAE's plain full-size MLM loss as a module, so that the loop (and DDP) can drive it."""

    def __init__(self, smae: SMAE):
        super().__init__()
        self.smae = smae

    def forward(self, batch: dict):
        from retrieval.losses import LossOutput

        loss = self.smae.mlm_loss(batch)
        return LossOutput(loss, {"loss": loss.detach()})


class HeadWarmupTask:
    """The new MLM head alone (encoder, decoder and the tied word embeddings frozen) on plain MLM."""

    name = "smae-head-warmup"
    examples_name = "windows"
    can_validate = False
    can_cache_gradients = False

    def __init__(self, smae: SMAE, dataset: WindowDataset, collate: SMAECollator, fingerprint: dict):
        self.model = HeadWarmup(smae)
        self.dataset = dataset
        self.collate = collate
        self._fingerprint = {**fingerprint, "stage": self.name}

    def compute_loss(self, model, batch: dict, step: int):
        return model(batch)

    def batch_examples(self, batch: dict) -> int:
        return len(batch["input_ids"])

    def step_flops(self, batch: dict, step: int) -> int:
        return head_warmup_flops(self.model.smae.encoder.config, batch)

    def save_model(self, model: HeadWarmup, directory: Path, step: int) -> None:
        """The warmed-up head's own parameters (not the tied embeddings): `head.safetensors`."""
        directory.mkdir(parents=True, exist_ok=True)
        trained = {id(p) for p in model.smae.head_parameters()}
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.smae.head.named_parameters() if id(p) in trained}
        save_file(tensors, str(directory / "head.safetensors"))

    def fingerprint(self) -> dict:
        return self._fingerprint


def probe_loss(model: SMAE, dataset: WindowDataset, collate: SMAECollator, batch_size: int) -> float:
    """Mean full-size MLM loss (eval mode) over `PROBE_WINDOWS` windows spread over the dataset."""
    count = min(PROBE_WINDOWS, len(dataset))
    keys = [(i * len(dataset) // count, -1) for i in range(count)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = collate([dataset[k] for k in keys[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            losses.append((float(model.mlm_loss(batch)), len(batch["input_ids"])))
    model.train(was_training)
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def warm_up_head(
    model: SMAE,
    dataset: WindowDataset,
    collate: SMAECollator,
    settings: TrainSettings,
    fingerprint: dict,
    run_dir: Path,
) -> dict:
    """Train the new head for `steps` with everything else frozen; the probe's MLM loss before and after."""
    steps = settings.max_steps
    model.to(distributed_state().device)
    before = probe_loss(model, dataset, collate, settings.batch_size)
    head = {id(p) for p in model.head_parameters()}
    frozen = [p for p in model.parameters() if id(p) not in head and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        task = HeadWarmupTask(model, dataset, collate, fingerprint)
        fit(task, settings, run_dir, run_dir / "model")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    after = probe_loss(model, dataset, collate, settings.batch_size)
    print(
        f"smae: head warm-up ({steps} steps, encoder frozen): MLM loss on {min(PROBE_WINDOWS, len(dataset))} "
        f"windows {before:.4f} -> {after:.4f}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "steps": steps,
        "probe_windows": min(PROBE_WINDOWS, len(dataset)),
        "mlm_loss_before": round(before, 4),
        "mlm_loss_after": round(after, 4),
    }


def tokenizer_hash(tokenizer) -> str:
    """A short hash of a fast tokenizer's full definition (vocabulary, normaliser, ...)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def text_sources(cfg) -> list[dict]:
    """The `(source, text_field, hf_config, hf_split)` records `pretrain.text` stands for."""
    p, d = cfg.pretrain, cfg.data
    if str(p.text) != TRAIN_DATA:
        return [{"source": str(p.text), "text_field": p.text_field, "hf_config": p.hf_config, "hf_split": p.hf_split}]
    corpus = d.train_corpus or d.corpus
    return [
        {"source": str(corpus), "text_field": "text", "hf_config": None, "hf_split": "train"},
        {"source": str(d.train), "text_field": "query", "hf_config": None, "hf_split": d.train_split},
    ]


def prepare_windows(cfg, tokenizer, directory: Path) -> WindowDataset:
    """The packed windows of `pretrain.text` (built on the main process; others wait and read them)."""
    p = cfg.pretrain
    sources = text_sources(cfg)
    identity = {"sources": sources, "max_texts": p.max_texts, "tokenizer": tokenizer_hash(tokenizer)}
    files = {s["source"]: Path(s["source"]).stat() for s in sources if Path(s["source"]).is_file()}
    if files:  # a rewritten local file is packed again
        identity["files"] = {k: {"bytes": v.st_size, "mtime_ns": v.st_mtime_ns} for k, v in files.items()}

    def texts():
        chained = itertools.chain.from_iterable(
            iter_texts(s["source"], s["text_field"], s["hf_config"], s["hf_split"]) for s in sources
        )
        return itertools.islice(chained, p.max_texts)

    with distributed_state().main_process_first():
        return build_windows(directory, texts, tokenizer, int(p.max_length), identity, p.max_tokens)


def run_pretraining(cfg) -> TrainResult:
    """SMAE-pre-train `model.name_or_path` on `pretrain.text`; returns where the encoder went."""
    settings = TrainSettings.from_config(cfg)
    m, p = cfg.model, cfg.pretrain
    sizes = sizes_of(cfg)
    num_layers, hidden = model_shape(m.name_or_path)
    sizes.validate(num_layers, hidden, m.name_or_path)
    torch.manual_seed(int(cfg.seed))  # a new head's weights (the decoder copies the first layers)
    model, tokenizer, head_from_checkpoint = SMAE.from_pretrained(
        m.name_or_path, sizes, int(p.decoder_layers), m.attn_implementation, str(m.pooling)
    )
    if sizes.largest.layers < num_layers:  # layers above the deepest size get no loss (and would stall DDP)
        model.encoder.truncate_(sizes.largest.layers)
    collate = SMAECollator(tokenizer, p.enc_mask_ratio, p.dec_mask_ratio, p.mask_replace, int(cfg.seed))
    paths = experiment_paths(cfg)
    windows = prepare_windows(cfg, tokenizer, Path(p.windows_dir) if p.windows_dir else paths.root / "windows")
    warmup_steps = p.head_warmup_steps  # checked (a whole number >= 0) by the schema
    warmup = None
    if warmup_steps and not head_from_checkpoint:
        warmup_settings = dataclasses.replace(
            settings, max_steps=warmup_steps, save_steps=min(settings.save_steps, warmup_steps)
        )
        fingerprint = config_fingerprint(cfg, pretrain=OmegaConf.to_container(p, resolve=True))
        warmup = warm_up_head(model, windows, collate, warmup_settings, fingerprint, paths.root / WARMUP_DIR)
    task = SMAETask(model, tokenizer, windows, collate, cfg, head_from_checkpoint, warmup)
    return fit(task, settings, paths.root, paths.model)


@cli_entry
def main(argv=None) -> None:
    parser = stage_parser(
        "train.pretrain",
        "SMAE pre-training of a Starbucks encoder (the `pretrain` config section); "
        "re-run the same command to resume after a kill.",
        SMAE_CONFIG,
    )
    cfg, _ = parse_stage_args(parser, argv)
    run_pretraining(cfg)


if __name__ == "__main__":
    main()
