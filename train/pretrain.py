"""`python -m train.pretrain --config configs/smae.yaml`: SMAE pre-training (paper section 3.2).

`run_pretraining(cfg)` packs the `pretrain.text` source into fixed-length windows (once, cached
under `pretrain.windows_dir`), builds the SMAE model (`train.smae`) from
`model.name_or_path` and trains it with the shared loop (`train.trainer.fit`: bf16 on GPU,
checkpoints, resume, progress, per-size `enc/<size>` and `dec/<size>` loss logging). The
encoder alone is written to `<output_dir>/model`, ready as `model.name_or_path` of fine-tuning.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from retrieval.cli import parse_stage_args, stage_parser
from retrieval.modeling import model_shape
from retrieval.config import experiment_paths, sizes_of
from retrieval.errors import cli_entry
from train.flops import smae_step_flops
from train.masking import SMAECollator, WindowDataset, build_windows, iter_texts
from train.smae import SMAE
from train.trainer import TrainResult, TrainSettings, config_fingerprint, distributed_state, fit

SMAE_CONFIG = "configs/smae.yaml"  # the default config of `python -m train.pretrain`


class SMAETask:
    """Packed text windows -> two maskings -> the SMAE loss; saves the encoder only."""

    name = "smae"
    examples_name = "windows"

    def __init__(self, model: SMAE, tokenizer, dataset: WindowDataset, collate: SMAECollator, cfg,
                 head_from_checkpoint: bool):
        self.model = model
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.collate = collate
        config = OmegaConf.to_container(cfg, resolve=True)
        self.meta = {
            "base_model": cfg.model.name_or_path,
            "mlm_head": "checkpoint" if head_from_checkpoint else "new",
            "windows": len(dataset),
            "config": config,
        }
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


def tokenizer_hash(tokenizer) -> str:
    """A short hash of a fast tokenizer's full definition (vocabulary, normaliser, ...)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def prepare_windows(cfg, tokenizer, directory: Path) -> WindowDataset:
    """The packed windows of `pretrain.text` (built on the main process; others wait and read them)."""
    p = cfg.pretrain
    identity = {"source": str(p.text), "text_field": p.text_field, "hf_config": p.hf_config, "hf_split": p.hf_split,
                "max_texts": p.max_texts, "tokenizer": tokenizer_hash(tokenizer)}
    if Path(str(p.text)).is_file():  # a rewritten local file is packed again
        stat = Path(str(p.text)).stat()
        identity["file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def texts():
        return iter_texts(str(p.text), p.text_field, p.hf_config, p.hf_split, p.max_texts)

    with distributed_state().main_process_first():
        return build_windows(directory, texts, tokenizer, int(p.max_length), identity, p.max_tokens)


def run_pretraining(cfg) -> TrainResult:
    """SMAE-pre-train `model.name_or_path` on `pretrain.text`; returns where the encoder went."""
    settings = TrainSettings.from_config(cfg)
    m, p = cfg.model, cfg.pretrain
    sizes = sizes_of(cfg)
    num_layers, hidden = model_shape(m.name_or_path)
    sizes.validate(num_layers, hidden, m.name_or_path)
    torch.manual_seed(int(cfg.seed))  # the new head and decoder weights
    model, tokenizer, head_from_checkpoint = SMAE.from_pretrained(m.name_or_path, sizes, int(p.decoder_layers),
                                                                  m.attn_implementation)
    if sizes.largest.layers < num_layers:  # layers above the deepest size get no loss (and would stall DDP)
        model.encoder.truncate_(sizes.largest.layers)
    collate = SMAECollator(tokenizer, p.enc_mask_ratio, p.dec_mask_ratio, p.mask_replace, int(cfg.seed))
    paths = experiment_paths(cfg)
    windows = prepare_windows(cfg, tokenizer, Path(p.windows_dir) if p.windows_dir else paths.root / "windows")
    task = SMAETask(model, tokenizer, windows, collate, cfg, head_from_checkpoint)
    return fit(task, settings, paths.root, paths.model)


@cli_entry
def main(argv=None) -> None:
    parser = stage_parser("train.pretrain", "SMAE pre-training of a Starbucks encoder (the `pretrain` config section); "
                                            "re-run the same command to resume after a kill.", SMAE_CONFIG)
    cfg, _ = parse_stage_args(parser, argv)
    run_pretraining(cfg)


if __name__ == "__main__":
    main()
