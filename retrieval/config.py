"""Experiment configuration: one YAML file drives all four stages.

A config is the `DEFAULTS` schema below, overlaid by the YAML file (which may name a `base:`
file it extends, relative to itself), overlaid by `key=value` command-line overrides
(OmegaConf dotlist syntax). Every key must exist in the schema, except under the open
mappings listed in `OPEN_KEYS`; a typo is an error naming the nearest valid key.
Paths of the stages' outputs are derived from `output_dir` (see `experiment_paths`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retrieval.errors import StarbucksError
from retrieval.settings import TEXT_OVERRIDES, validate_config
from retrieval.sizes import SizeList

DEFAULT_CONFIG = "configs/default.yaml"

DEFAULTS: dict[str, Any] = {
    "name": "default",
    "output_dir": "runs/${name}",
    "seed": 42,
    "model": {
        "name_or_path": "sentence-transformers/all-MiniLM-L6-v2",
        "pooling": "mean",  # cls | mean
        "normalize": True,  # True: cosine similarity; False: dot product
        "query_max_length": 32,
        "passage_max_length": 196,
        "query_prefix": "",
        "passage_prefix": "",
        "attn_implementation": "sdpa",
        "packing": "auto",  # auto | true | false: a batch's real tokens as one unpadded sequence (auto: on the CPU, and on CUDA with a varlen kernel)
        "allow_pooling_change": False,  # fine-tune an SMAE checkpoint with another pooling than its bottleneck's
    },
    # Ordered small -> large; each entry {name, layers, dim} or "LxD".
    "sizes": [
        {"name": "demi", "layers": 1, "dim": 32},
        {"name": "short", "layers": 2, "dim": 64},
        {"name": "tall", "layers": 3, "dim": 96},
        {"name": "grande", "layers": 4, "dim": 128},
        {"name": "venti", "layers": 5, "dim": 256},
        {"name": "trenta", "layers": 6, "dim": 384},
    ],
    "data": {
        # corpus: a BEIR directory, a corpus .jsonl[.gz] / .tsv file, or irds:<ir_datasets id>
        "corpus": "data/debian-pkgs-mini",
        # training groups: local JSONL (ids-only or inline texts) or hf:<hub dataset id>
        "train": "data/debian-pkgs-mini/train.jsonl.gz",
        "train_corpus": None,  # corpus the ids-only training groups point into (None: data.corpus)
        "train_split": "train",  # HF split name for hf: sources
        "max_train_groups": None,  # use only the first N groups (None: all)
        # eval split name -> BEIR directory | irds:<id> | {queries: FILE, qrels: FILE}
        "eval_splits": {"dev": "data/debian-pkgs-mini", "test": "data/debian-pkgs-mini"},
    },
    "train": {
        "method": "srl",  # srl | 2dmse | separate | full | srl-depth | srl-width (fine-tuning); smae (pre-training)
        "size": None,  # for method=separate: the one size to train
        "epochs": 1,
        "max_steps": None,  # stop after this many optimizer steps (None: epochs)
        "batch_size": 16,  # queries per step (per device)
        "group_size": 8,  # 1 positive + group_size-1 hard negatives
        "grad_accum": 1,
        "learning_rate": 5.0e-5,
        "weight_decay": 0.0,
        "warmup_ratio": 0.1,
        "scheduler": "linear",
        "max_grad_norm": 1.0,
        "temperature": 1.0,  # InfoNCE temperature (1.0 with dot product; ~0.05 with cosine)
        "kl_weight": 1.0,
        "kl_temperature": 1.0,
        "cross_device_negatives": True,  # under DDP: every device's passages are negatives for every query
        "size_weights": None,  # srl: one weight per size (None: all 1, i.e. the paper's mean)
        "twodmse_dims": "uniform",  # 2dmse: uniform (d ~ U(1, D-1), the paper) | list (d from the size list's dims)
        "precision": "auto",  # auto (bf16 on GPU; on CPU bf16 where the chip has it, AVX512-BF16/AMX, else fp32) | bf16 | fp16 | fp32
        "gradient_checkpointing": False,
        "length_buckets": "auto",  # run a batch as N length-sorted sub-batches (auto: 1 per 131,072 padded tokens on GPU, 1 on CPU)
        "grad_cache": False,  # gradient caching: the whole batch's loss, activations of one chunk at a time (docs/training.md)
        "grad_cache_chunk": 32,  # texts (queries or passages) per re-run chunk under train.grad_cache
        "save_steps": 500,  # checkpoint every N steps (and at the end) under <output_dir>/checkpoints
        "save_total_limit": 2,  # keep the newest N checkpoints (0: all)
        "logging_steps": 10,
        "dataloader_workers": 0,
        "resume": True,  # continue from the newest checkpoint; false: delete the checkpoints, start over
        "eval_steps": None,  # validate every size every N steps (None: no validation during training)
        "eval_split": "heldout",  # heldout (train.holdout_queries) | a data.eval_splits entry (needs eval_on_reported_split)
        "holdout_queries": 0,  # training queries held back (never trained on) as the `heldout` validation split
        "eval_on_reported_split": False,  # true: validate on a split the eval stage also reports (selection on test data)
        "eval_queries": 200,  # judged queries sampled (seeded) from the split (None: all)
        "eval_metric": "RR@10",  # ir_measures name, logged as eval/<size>/<metric>
        "eval_candidates": "auto",  # corpus | N: per query its judged passages + BM25 + random up to N | auto (corpus up to 20,000 passages, else 1000)
        "keep_best": None,  # avg | <size name>: the final model is the checkpoint with the best eval_metric there
        "early_stopping_patience": None,  # stop after N validations without a new best (needs keep_best)
        "report_to": "none",  # none | tensorboard | wandb | mlflow | ... (accelerate trackers; comma list for several)
    },
    "pretrain": {
        "text": "data/debian-pkgs/corpus.jsonl.gz",  # local .txt/.jsonl[.gz], a BEIR corpus, hf:<dataset id>, or train-data (data.train_corpus's passages + data.train's queries)
        "text_field": "text",
        "hf_config": None,
        "max_length": 128,
        "enc_mask_ratio": 0.2,
        "dec_mask_ratio": 0.4,
        "decoder_layers": 1,
        "max_texts": None,
        "hf_split": "train",  # split of an hf: source
        "max_tokens": None,  # pack at most this many tokens (None: the whole source)
        "head_warmup_steps": 100,  # a new MLM head (backbone without one) first trains alone this many steps, encoder frozen
        "mask_replace": "bert",  # bert: [MASK] 80% / random 10% / kept 10%; mask: always [MASK]
        "windows_dir": None,  # packed-window cache (None: <output_dir>/windows)
    },
    "encode": {
        "model": None,  # model to encode with (None: paths.model if trained, else model.name_or_path)
        "part_models": {},  # label -> model for hybrid sizes' parts from other models (`3x384+6x64@width`)
        "parallel_parts": "auto",  # those parts at the same time as the model's own, a thread each (auto: on a GPU)
        "sizes": "all",  # all | comma list of names or LxD (search and eval follow unless set)
        "batch_size": 128,
        "shard_rows": 100000,
        "splits": "all",  # which eval splits' queries to encode (all | comma list)
        "device": "auto",  # auto | cpu | cuda | cuda:N
        "precision": "auto",  # auto (fp16 autocast on GPU; on CPU bf16 where the chip has it, else fp32) | fp32 | fp16 | bf16
        "dataloader_workers": "auto",  # processes tokenising ahead (auto: up to 8 on GPU, 0 on CPU)
        "shard": None,  # "i/n": encode one slice of the corpus
    },
    "search": {
        "index": "Flat",  # any faiss index_factory string
        "params": {},  # faiss search parameters, e.g. {efSearch: 128} or {nprobe: 32}
        "depth": 1000,  # run depth (small collections: 100)
        "batch_size": 1024,
        "device": "auto",  # auto | cpu | cuda
        "backend": "auto",  # auto | faiss | torch
        "sizes": "${encode.sizes}",  # all: every size with finished embeddings
        "splits": "${encode.splits}",
        "train_rows": 200000,  # vectors sampled to train a non-flat index (IVF, PQ)
        "shards_per_index": None,  # non-flat indexes: one index per this many embedding shards (None: one)
        "rebuild": False,  # rebuild a saved index that no longer matches the embeddings
        "torch_dtype": "auto",  # torch backend matmul: auto (fp16 on GPU, fp32 on CPU) | fp16 | fp32
        "topk_block": "auto",  # torch backend: exact top-k through maxima of blocks of N passages (auto: 32 on GPU; null: torch.topk)
    },
    "eval": {
        "metrics": ["RR@10", "nDCG@10", "R@100", "R@1000"],
        "rel_level": 1,  # minimum relevance for binary measures (TREC DL: 2)
        "split_rel_level": {},  # per-split override, e.g. {dl19: 2}
        "baseline": None,  # experiment that comparisons test against (None: the first given)
        "plot": True,
        "sizes": "${search.sizes}",  # all: every size with a run file
        "splits": "${search.splits}",
        "alpha": 0.05,  # significance level of the paired t-test
    },
    # `python -m experiment` / `make experiment`: the paper's comparison, one run per method under
    # <output_dir>/<run>, every run the four stages of this config with the method's overrides.
    "experiment": {
        "methods": "all",  # all | comma list of: zeroshot, full, separate, 2dmse, srl, srl-matched, srl-nokl, smae-srl,
        #                    srl-depth, srl-width, hybrid
        "reference": "smae-srl",  # every other method is t-tested against this one
        "grid": True,  # also encode/search the whole (layer, dim) grid: layers 1..N x the size list's dims
        "grid_split": "dev",  # the split the grid heatmaps show
        "heatmap_metric": "nDCG@10",
        "smae": [],  # key=value overrides of the SMAE pre-training run (after train.method=smae)
        "report_dir": None,  # where results.md and results/ go (None: <output_dir>/report)
        "run_depth": 100,  # depth of the run files copied next to the report
        "grid_run_depth": 10,  # ... of the heatmaps' other grid cells (the heatmap metric needs 10)
        "seeds": None,  # srl, 2dmse and separate once per seed, the tables their mean and spread (None: [seed])
        "suite": None,  # a suite file (configs/suites/offline.yaml): every reported run on its collections (eval.suite)
        "hybrids": None,  # the hybrid arm's sizes: parts of srl-depth's model, `@<run>` of another run's (None: derived)
    },
    # Stage outputs; empty means derived from output_dir (see experiment_paths).
    "paths": {"model": None, "embeddings": None, "index": None, "runs": None, "eval": None},
}

# Mappings whose keys are the user's (split names, FAISS parameters, ...).
OPEN_KEYS = {"data.eval_splits", "search.params", "eval.split_rel_level", "encode.part_models"}


def _check_keys(user: Any, schema: Any, prefix: str, where: str) -> None:
    """Raise on the first key of `user` that the schema does not know."""
    if not isinstance(user, dict) or not isinstance(schema, dict):
        return
    for key, value in user.items():
        full = f"{prefix}{key}"
        if key not in schema:
            near = [prefix + k for k in difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)]
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {', '.join(sorted(schema))}"
            raise StarbucksError(f"unknown config key '{full}' in {where}{hint}")
        if full not in OPEN_KEYS:
            _check_keys(value, schema[key], full + ".", where)


def _merge(base, data: dict) -> DictConfig:
    """Merge `data` onto `base`; an open mapping given in `data` replaces the base's whole mapping."""
    base = OmegaConf.create(base if not isinstance(base, DictConfig) else OmegaConf.to_container(base))
    for key in OPEN_KEYS:
        section, name = key.split(".")
        if isinstance(data.get(section), dict) and name in data[section] and section in base:
            base[section][name] = {}
    return OmegaConf.merge(base, data)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML config, following its `base:` chain (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise StarbucksError(f"config {path} extends itself through `base:`; remove the cycle")
    if not path.is_file():
        raise StarbucksError(f"config file {path} not found; pass --config PATH (default: {DEFAULT_CONFIG})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise StarbucksError(f"config {path}{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise StarbucksError(f"config {path} must be a mapping of sections, not {type(data).__name__}")
    base = data.pop("base", None)
    _check_keys(data, DEFAULTS, "", str(path))
    if base is None:
        return data
    parent = _read_yaml(path.parent / base, seen + (path,))
    return OmegaConf.to_container(_merge(parent, data))


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a config: schema defaults <- YAML (with `base:` chain) <- `key=value` overrides."""
    cfg = OmegaConf.create(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)))
    dot = _parse_overrides(list(overrides))
    _check_keys(dot, DEFAULTS, "", "the command line")
    cfg = OmegaConf.merge(cfg, dot)  # entry by entry: `data.eval_splits.dev=...` keeps the other splits
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise StarbucksError(f"config interpolation failed: {err}") from None
    _drop_removed_entries(cfg)
    validate_config(cfg, DEFAULTS, OPEN_KEYS)
    sizes_of(cfg)  # validate early
    return cfg


def _parse_overrides(overrides: list[str]) -> dict:
    """`key=value` items as a nested dict (OmegaConf dotlist syntax); keys that hold names keep their
    value as written (`encode.sizes=0x32` is a size, not the hex number 50)."""
    parsed, literal = [], {}
    for item in overrides:
        if "=" not in item:
            raise StarbucksError(f"override {item!r} is not key=value (example: train.learning_rate=1e-4)")
        key, value = item.split("=", 1)
        if key.strip() in TEXT_OVERRIDES and value.strip() not in ("null", "") and not value.lstrip().startswith("["):
            literal[key.strip()] = value.strip()
        else:
            parsed.append(item)
    try:
        dot = OmegaConf.from_dotlist(parsed)
        for key, value in literal.items():
            OmegaConf.update(dot, key, value, force_add=True)
    except OmegaConfBaseException as err:
        raise StarbucksError(f"cannot parse overrides {overrides}: {err}") from None
    return OmegaConf.to_container(dot)


def _drop_removed_entries(cfg: DictConfig) -> None:
    """`null` removes an entry of an open mapping (`data.eval_splits.dev=null` drops an inherited split)."""
    for key in OPEN_KEYS:
        mapping = OmegaConf.select(cfg, key)
        if isinstance(mapping, DictConfig):
            for name in [k for k, v in mapping.items() if v is None]:
                del mapping[name]


def sizes_of(cfg: DictConfig) -> SizeList:
    """The config's ordered size list."""
    entries = cfg.sizes
    if isinstance(entries, (ListConfig, DictConfig)):
        entries = OmegaConf.to_container(entries)
    return SizeList.from_config(entries).require_ordered("sizes")


@dataclass(frozen=True)
class ExperimentPaths:
    """Where each stage reads and writes, derived from one experiment directory."""

    root: Path
    model: Path
    embeddings: Path
    index: Path
    runs: Path
    eval: Path


def experiment_paths(cfg: DictConfig) -> ExperimentPaths:
    root = Path(cfg.output_dir)
    p = cfg.paths

    def pick(key: str) -> Path:
        return Path(p[key]) if p.get(key) else root / key

    return ExperimentPaths(root, pick("model"), pick("embeddings"), pick("index"), pick("runs"), pick("eval"))
