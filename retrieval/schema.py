"""The config schema: every key's default, what it accepts (type, range) and what it means, in one place.

`SCHEMA` is a nested mapping of sections to `Key(default, doc, rule)` entries. From it come the
loader's defaults (`DEFAULTS`), the open mappings whose keys are the user's (`OPEN_KEYS`), each
typed key's rule (`KEY_RULES`: the entry's own, else what its default's type implies: a bool, whole
number or number key keeps its type), the keys whose command-line values stay text
(`TEXT_OVERRIDES`), the check of a loaded config (`validate_config`) and the key reference
`docs/configuration.md` (`reference_markdown`). The stages read the checked values.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml
from omegaconf import OmegaConf, open_dict

from retrieval.encoder import POOLINGS
from retrieval.errors import StarbucksError
from retrieval.packing import check_packing
from retrieval.quantize import FORMS as QUANTIZATION_FORMS, parse_quantization
from retrieval.samplers import FINETUNE_METHODS, TWODMSE_DIMS
from retrieval.settings import whole_number

# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """How one config key is checked: `check(value, key) -> normalised value` (raises one line);
    `accepts`: the accepted forms, for the docs. `literal`: the key holds names, so a command-line
    value is taken as text, never parsed as a number."""

    check: Callable[[Any, str], Any]
    accepts: str
    literal: bool = False


def _or(*forms: str) -> str:
    return " or ".join(f for f in forms if f)


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    allow_none: bool = False,
) -> Rule:
    """A real number (whole numbers and numeric strings accepted) within the bounds."""
    lo = "" if minimum is None else f"{'>' if above else '>='} {minimum}"
    hi = "" if maximum is None else f"{'<' if below else '<='} {maximum}"
    bounds = " and ".join(p for p in (lo, hi) if p)

    def check(value, key):
        if value is None and allow_none:
            return None
        x = value
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                pass
        if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:
            raise StarbucksError(f"{key} = {value!r} is not a number; write a number such as {key}=0.5")
        lo_ok = minimum is None or (x > minimum if above else x >= minimum)
        hi_ok = maximum is None or (x < maximum if below else x <= maximum)
        if not (lo_ok and hi_ok):
            raise StarbucksError(f"{key} = {value!r} must be {bounds}")
        return float(x)

    return Rule(check, _or(f"a number {bounds}".strip(), "null" if allow_none else ""))


def integer(minimum: int | None = 0, *, auto: bool = False, allow_none: bool = False) -> Rule:
    """A whole number >= `minimum` (any where None; `auto` / null where allowed, kept as given)."""
    low = -(2**63) if minimum is None else minimum
    whole = "a whole number" if minimum is None else f"a whole number >= {minimum}"
    return Rule(
        lambda value, key: whole_number(value, key, low, allow_none=allow_none, auto=auto),
        _or("auto" if auto else "", "null" if allow_none else "", whole),  # as `whole_number` words it
    )


def boolean() -> Rule:
    def check(value, key):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise StarbucksError(f"{key} = {value!r} must be true or false")

    return Rule(check, "true or false")


def choice(*options, allow_none: bool = False) -> Rule:
    def check(value, key):
        if value is None and allow_none:
            return None
        if value not in options:
            raise StarbucksError(f"{key} = {value!r} is not one of {', '.join(map(str, options))}")
        return value

    return Rule(check, _or(" | ".join(map(str, options)), "null" if allow_none else ""))


def text(allow_none: bool = True) -> Rule:
    """A string (names, paths); a number here was almost surely mis-parsed (`0x32` is hex 50)."""

    def check(value, key):
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise StarbucksError(f"{key} = {value!r} must be text; quote it in YAML ('{value}')")
        return value

    return Rule(check, _or("text", "null" if allow_none else ""), literal=True)


def names() -> Rule:
    """A selection of names: `all`, a comma list, or a YAML list of names (kept as strings)."""

    def check(value, key):
        if isinstance(value, Sequence) and not isinstance(value, str):  # a list, or a YAML list (ListConfig)
            bad = [v for v in value if not isinstance(v, str)]
            if bad:
                raise StarbucksError(f"{key} holds {bad[0]!r}, not a name; quote it in YAML ('{bad[0]}')")
            return value
        return text(allow_none=True).check(value, key)

    return Rule(check, "a comma list or a list of names", literal=True)


def seeds() -> Rule:
    """null, or whole numbers >= 0 (one number is a list of one)."""

    def check(value, key):
        if value is None:
            return None
        items = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
        return [whole_number(x, f"{key}[{i}]", 0) for i, x in enumerate(items)]

    return Rule(check, "null or a list of whole numbers >= 0")


def quantization() -> Rule:
    """A list of vector precisions (a comma string accepted), each a `retrieval.quantize` form (one line
    naming the key, the bad item and the accepted forms otherwise), no duplicates; normalised to a list
    of their names."""

    def check(value, key):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, Sequence) or not items:
            raise StarbucksError(f"{key} = {value!r} names no precision; give a list of {QUANTIZATION_FORMS}")
        out = []
        for item in items:
            name = parse_quantization(item.strip() if isinstance(item, str) else item, key).name
            if name in out:
                raise StarbucksError(f"{key} names {name!r} twice; give each of {QUANTIZATION_FORMS} at most once")
            out.append(name)
        return out

    return Rule(check, f"a list (or comma list) of {QUANTIZATION_FORMS}", literal=True)


def _auto_or(rule: Rule, *words: str) -> Rule:
    """`rule`, or one of `words` kept as given."""
    return Rule(lambda v, k: v if v in words else rule.check(v, k), _or(*words, rule.accepts), rule.literal)


# ---------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Key:
    """One config key: its default, what it means, its rule (None: what the default's type implies)
    and, for a mapping whose keys are the user's (split names, FAISS parameters), `open`."""

    default: Any
    doc: str
    rule: Rule | None = None
    open: bool = False


SCHEMA: dict[str, Any] = {
    "name": Key("default", "the experiment's name (the run tag; the default output directory)"),
    "output_dir": Key("runs/${name}", "where every stage writes (the `paths` below are derived from it)"),
    "seed": Key(42, "the seed of sampling, shuffling and initialisation", integer(0)),
    "model": {
        "name_or_path": Key("sentence-transformers/all-MiniLM-L6-v2", "the backbone: a hub id or a local directory"),
        "pooling": Key("mean", "how a size's vector is pooled from its layer", choice(*POOLINGS)),
        "normalize": Key(True, "true: cosine similarity (unit vectors); false: dot product"),
        "query_max_length": Key(32, "query tokens kept", integer(1)),
        "passage_max_length": Key(196, "passage tokens kept", integer(1)),
        "query_prefix": Key("", "text put before every query"),
        "passage_prefix": Key("", "text put before every passage"),
        "attn_implementation": Key("sdpa", "transformers' attention implementation"),
        "packing": Key(
            "auto",
            "a batch's real tokens as one unpadded sequence (auto: on the CPU, and on CUDA with a varlen kernel)",
            Rule(lambda v, k: check_packing(v), "auto | true | false"),
        ),
        "allow_pooling_change": Key(False, "fine-tune an SMAE checkpoint with another pooling than its bottleneck's"),
    },
    "sizes": Key(
        [
            {"name": "demi", "layers": 1, "dim": 32},
            {"name": "short", "layers": 2, "dim": 64},
            {"name": "tall", "layers": 3, "dim": 96},
            {"name": "grande", "layers": 4, "dim": 128},
            {"name": "venti", "layers": 5, "dim": 256},
            {"name": "trenta", "layers": 6, "dim": 384},
        ],
        "the Starbucks sizes, ordered small to large: each `{name, layers, dim}` or `LxD`",
    ),
    "data": {
        "corpus": Key(
            "data/debian-pkgs-mini", "the corpus: a BEIR directory, a corpus .jsonl[.gz] / .tsv file, or irds:<id>"
        ),
        "train": Key(
            "data/debian-pkgs-mini/train.jsonl.gz",
            "training groups: local JSONL (ids only or inline texts) or hf:<hub dataset id>",
        ),
        "train_corpus": Key(None, "the corpus the ids-only training groups point into (null: data.corpus)", text()),
        "train_split": Key("train", "the split of an hf: training source"),
        "max_train_groups": Key(None, "use only the first N training groups (null: all)", integer(1, allow_none=True)),
        "eval_splits": Key(
            {"dev": "data/debian-pkgs-mini", "test": "data/debian-pkgs-mini"},
            "eval split name -> BEIR directory | irds:<id> | {queries: FILE, qrels: FILE}; "
            "a config's mapping replaces this one, `name=null` drops an inherited split",
            open=True,
        ),
    },
    "train": {
        "method": Key(
            "srl",
            "what to train: a fine-tuning method (docs/training.md) or smae (SMAE pre-training, docs/pretraining.md)",
            choice(*FINETUNE_METHODS, "smae"),
        ),
        "size": Key(None, "method separate: the one size to train (a name or LxD)", text()),
        "epochs": Key(1, "passes over the training groups", number(0, above=True)),
        "max_steps": Key(None, "stop after this many optimizer steps (null: epochs)", integer(1, allow_none=True)),
        "batch_size": Key(16, "queries per step (per device)", integer(1)),
        "group_size": Key(8, "passages per query: 1 positive + group_size-1 hard negatives", integer(1)),
        "grad_accum": Key(1, "micro-batches per optimizer step", integer(1)),
        "learning_rate": Key(5.0e-5, "AdamW's peak learning rate", number(0, above=True)),
        "weight_decay": Key(0.0, "AdamW's weight decay", number(0)),
        "warmup_ratio": Key(0.1, "the share of steps the learning rate warms up", number(0, 1, below=True)),
        "scheduler": Key(
            "linear",
            "the transformers learning-rate schedule (warm-up and total steps only)",
            choice(
                "linear",
                "cosine",
                "cosine_with_restarts",
                "polynomial",
                "constant",
                "constant_with_warmup",
                "inverse_sqrt",
            ),
        ),
        "max_grad_norm": Key(1.0, "gradient clipping norm (null: none)", number(0, above=True, allow_none=True)),
        "temperature": Key(1.0, "InfoNCE temperature (1.0 with dot product; ~0.05 with cosine)", number(0, above=True)),
        "kl_weight": Key(1.0, "weight of each size's KL term to the largest visited size", number(0)),
        "kl_temperature": Key(1.0, "softmax temperature of the KL term", number(0, above=True)),
        "cross_device_negatives": Key(True, "under DDP: every device's passages are negatives for every query"),
        "size_weights": Key(None, "srl (-depth, -width): one weight per size (null: all 1, the paper's mean)"),
        "twodmse_dims": Key(
            "uniform",
            "2dmse: uniform (d ~ U(1, D-1), the paper) | list (d from the size list's dims)",
            choice(*TWODMSE_DIMS),
        ),
        "precision": Key(
            "auto",
            "auto (bf16 on GPU; on CPU bf16 where the chip has it, AVX512-BF16/AMX, else fp32) | bf16 | fp16 | fp32",
            choice("auto", "bf16", "fp16", "fp32"),
        ),
        "dropout_masks": Key(
            "auto",
            "auto (numpy on the CPU, torch elsewhere) | numpy (NumPy-drawn masks on the CPU, retrieval/dropout.py) "
            "| torch (PyTorch's dropout)",
            choice("auto", "numpy", "torch"),
        ),
        "gradient_checkpointing": Key(False, "recompute activations in the backward pass (less memory)"),
        "length_buckets": Key(
            "auto",
            "run a batch as N length-sorted sub-batches (auto: 1 per 131,072 padded tokens on GPU, 1 on CPU)",
            integer(1, auto=True),
        ),
        "grad_cache": Key(
            False,
            "gradient caching: the whole batch's loss, activations of one chunk at a time (docs/training.md)",
        ),
        "grad_cache_chunk": Key(32, "texts (queries or passages) per re-run chunk under train.grad_cache", integer(1)),
        "save_steps": Key(500, "checkpoint every N steps (and at the end) under <output_dir>/checkpoints", integer(1)),
        "save_total_limit": Key(2, "keep the newest N checkpoints (0 or null: all)", integer(0, allow_none=True)),
        "logging_steps": Key(10, "log the loss every N steps", integer(1)),
        "dataloader_workers": Key(0, "processes loading training batches", integer(0)),
        "resume": Key(True, "continue from the newest checkpoint; false: delete the checkpoints, start over"),
        "eval_steps": Key(
            None,
            "validate every size every N steps (null: no validation during training)",
            integer(1, allow_none=True),
        ),
        "eval_split": Key(
            "heldout",
            "heldout (train.holdout_queries) | a data.eval_splits entry (needs eval_on_reported_split)",
            text(allow_none=False),
        ),
        "holdout_queries": Key(
            0, "training queries held back (never trained on) as the `heldout` validation split", integer(0)
        ),
        "eval_on_reported_split": Key(
            False, "true: validate on a split the eval stage also reports (selection on test data)"
        ),
        "eval_queries": Key(
            200, "judged queries sampled (seeded) from the split (null: all)", integer(1, allow_none=True)
        ),
        "eval_metric": Key("RR@10", "ir_measures name, logged as eval/<size>/<metric>", text(allow_none=False)),
        "eval_candidates": Key(
            "auto",
            "corpus | N: per query its judged passages + BM25 + random up to N | "
            "auto (corpus up to 20,000 passages, else 1000)",
            _auto_or(integer(1), "auto", "corpus"),
        ),
        "keep_best": Key(
            None, "avg | <size name>: the final model is the checkpoint with the best eval_metric there", text()
        ),
        "early_stopping_patience": Key(
            None,
            "stop after N validations without a new best (needs train.eval_steps)",
            integer(1, allow_none=True),
        ),
        "report_to": Key(
            "none",
            "none | tensorboard | wandb | mlflow | ... (accelerate trackers; comma list for several)",
            text(allow_none=False),
        ),
    },
    "pretrain": {
        "text": Key(
            "data/debian-pkgs/corpus.jsonl.gz",
            "the text source: local .txt/.jsonl[.gz], a BEIR corpus, hf:<dataset id>, "
            "or train-data (data.train_corpus's passages + data.train's queries)",
        ),
        "text_field": Key("text", "the field of .jsonl and hf: rows"),
        "hf_config": Key(None, "the config of an hf: source"),
        "max_length": Key(128, "window length in tokens, [CLS] and [SEP] included", integer(8)),
        "enc_mask_ratio": Key(0.2, "whole-word mask ratio of the encoder's input", number(0, 1)),
        "dec_mask_ratio": Key(0.4, "whole-word mask ratio of the decoder's input", number(0, 1)),
        "decoder_layers": Key(1, "transformer layers of the decoder", integer(1)),
        "max_texts": Key(None, "read at most this many texts (null: all)", integer(1, allow_none=True)),
        "hf_split": Key("train", "the split of an hf: source"),
        "max_tokens": Key(None, "pack at most this many tokens (null: the whole source)", integer(1, allow_none=True)),
        "head_warmup_steps": Key(
            100,
            "a new MLM head (backbone without one) first trains alone this many steps, encoder frozen "
            "(0: none; a checkpoint's own head gets none)",
            integer(0),
        ),
        "mask_replace": Key(
            "bert", "bert: [MASK] 80% / random 10% / kept 10%; mask: always [MASK]", choice("bert", "mask")
        ),
        "windows_dir": Key(None, "the packed-window cache (null: <output_dir>/windows)"),
    },
    "encode": {
        "model": Key(None, "model to encode with (null: paths.model if trained, else model.name_or_path)", text()),
        "part_models": Key(
            {}, "label -> model for hybrid sizes' parts from other models (`3x384+6x64@width`)", open=True
        ),
        "parallel_parts": Key(
            "auto",
            "encode those parts at the same time as the model's own, a thread each (auto: on a GPU)",
            _auto_or(boolean(), "auto"),
        ),
        "sizes": Key("all", "all | names or LxD: the sizes to encode (search and eval follow unless set)", names()),
        "batch_size": Key(128, "passages per forward pass", integer(1)),
        "shard_rows": Key(100000, "passages per embedding shard", integer(1)),
        "splits": Key("all", "all | eval splits whose queries are encoded", names()),
        "device": Key("auto", "auto | cpu | cuda | cuda:N"),
        "precision": Key(
            "auto",
            "auto (fp16 autocast on GPU; on CPU bf16 where the chip has it, else fp32) | fp32 | fp16 | bf16",
            choice("auto", "fp32", "fp16", "bf16"),
        ),
        "dataloader_workers": Key(
            "auto", "processes tokenising ahead (auto: up to 8 on GPU, 0 on CPU)", integer(0, auto=True)
        ),
        "shard": Key(None, "i/n: encode one slice of the corpus (null: all of it)", text()),
    },
    "search": {
        "index": Key("Flat", "a FAISS index_factory string (Flat: exact search over the shards)"),
        "params": Key({}, "FAISS search parameters, e.g. {efSearch: 128} or {nprobe: 32}", open=True),
        "depth": Key(1000, "results per query (the small configs: 100)", integer(1)),
        "batch_size": Key(1024, "queries per search call", integer(1)),
        "device": Key("auto", "auto (CUDA if available) | cpu | cuda"),
        "backend": Key(
            "auto",
            "auto (FAISS on CPU or with faiss-gpu, else torch on CUDA) | faiss | torch (exact search only)",
            choice("auto", "faiss", "torch"),
        ),
        "sizes": Key(
            "${encode.sizes}", "all | names or LxD: what to search (all: every size with embeddings)", names()
        ),
        "splits": Key("${encode.splits}", "all | the eval splits to search", names()),
        "train_rows": Key(200000, "vectors sampled to train a non-flat index (IVF, PQ)", integer(1)),
        "shards_per_index": Key(
            None,
            "non-flat indexes: one index per this many embedding shards (null: one)",
            integer(1, allow_none=True),
        ),
        "rebuild": Key(False, "rebuild a saved index that no longer matches the embeddings"),
        "torch_dtype": Key(
            "auto",
            "torch backend matmul: auto (fp16 on GPU, fp32 on CPU) | fp16 | fp32",
            choice("auto", "fp16", "fp32", "float16", "float32"),
        ),
        "topk_block": Key(
            "auto",
            "torch backend: exact top-k through maxima of blocks of N passages (auto: 32 on GPU; null or 0: torch.topk)",
            Rule(
                lambda v, k: v if v == 0 else whole_number(v, k, 2, allow_none=True, auto=True),
                "auto or a whole number >= 2 or 0 or null",
            ),
        ),
        "quantization": Key(
            ["fp16"],
            "the vector precisions searched per size: fp16 (the store as encoded), int8 (scalar quantisation, "
            "per-dim ranges calibrated on the corpus), binary (sign bits, Hamming distance); -rescore<K>: "
            "re-score the top K candidates with the fp16 vectors. Each gives its own run file "
            "(<size>.trec for fp16, <size>.<precision>.trec otherwise)",
            quantization(),
        ),
    },
    "eval": {
        "metrics": Key(["RR@10", "nDCG@10", "R@100", "R@1000"], "ir_measures names"),
        "rel_level": Key(1, "minimum relevance for binary measures (TREC DL: 2)", integer(0)),
        "split_rel_level": Key({}, "per-split rel_level, e.g. {dl19: 2}", open=True),
        "baseline": Key(None, "the experiment comparisons test against (null: the first given)", text()),
        "plot": Key(True, "write PNG plots"),
        "sizes": Key(
            "${search.sizes}", "all | names or LxD: what to evaluate (all: every size with a run file)", names()
        ),
        "splits": Key("${search.splits}", "all | the splits to evaluate", names()),
        "alpha": Key(0.05, "significance level of the paired t-test", number(0, 1, above=True, below=True)),
    },
    # `python -m experiment` / `make experiment`: the paper's comparison, one run per method under
    # <output_dir>/<run>, every run the four stages of this config with the method's overrides.
    "experiment": {
        "methods": Key(
            "all",
            "all | a comma list of: zeroshot, full, separate, 2dmse, srl, srl-matched, srl-nokl, smae-srl, "
            "srl-depth, srl-width, hybrid",
            names(),
        ),
        "reference": Key("smae-srl", "the method every other one is t-tested against"),
        "grid": Key(True, "also encode and search the whole (layer, dim) grid: layers 1..N x the size list's dims"),
        "grid_split": Key("dev", "the split the grid heatmaps show", text(allow_none=False)),
        "heatmap_metric": Key("nDCG@10", "the metric of the grid heatmaps"),
        "smae": Key([], "key=value overrides of the SMAE pre-training run (after train.method=smae)"),
        "report_dir": Key(None, "where results.md and results/ go (null: <output_dir>/report)"),
        "run_depth": Key(100, "depth of the run files copied next to the report", integer(1)),
        "grid_run_depth": Key(10, "depth of the heatmaps' other grid cells (the heatmap metric needs 10)", integer(1)),
        "seeds": Key(
            None, "srl, 2dmse and separate once per seed, the tables their mean and spread (null: [seed])", seeds()
        ),
        "suite": Key(None, "a suite file (configs/suites/offline.yaml): every reported run on its collections"),
        "hybrids": Key(
            None,
            "the hybrid arm's sizes: parts of srl-depth's model, `@<run>` of another run's (null: derived)",
            names(),
        ),
    },
    # Stage outputs; null means derived from output_dir (retrieval.config.experiment_paths).
    "paths": {
        "model": Key(None, "the trained model (null: <output_dir>/model)"),
        "embeddings": Key(None, "the embedding stores (null: <output_dir>/embeddings)"),
        "index": Key(None, "saved FAISS indexes (null: <output_dir>/index)"),
        "runs": Key(None, "run files (null: <output_dir>/runs)"),
        "eval": Key(None, "metrics files, tables and plots (null: <output_dir>/eval)"),
    },
}


# ---------------------------------------------------------------- what the schema gives


def walk(schema: Mapping = SCHEMA, prefix: str = "") -> Iterator[tuple[str, Key]]:
    """Every key of the schema as `(dotted name, Key)`, in order."""
    for name, entry in schema.items():
        if isinstance(entry, Key):
            yield prefix + name, entry
        else:
            yield from walk(entry, f"{prefix}{name}.")


def _defaults(schema: Mapping) -> dict:
    return {
        name: copy.deepcopy(entry.default) if isinstance(entry, Key) else _defaults(entry)
        for name, entry in schema.items()
    }


def _inferred(default) -> Rule | None:
    """The rule a default implies: a bool, whole number or number key keeps its type."""
    if isinstance(default, bool):
        return boolean()
    if isinstance(default, int):
        return integer(None)
    if isinstance(default, float):
        return number()
    return None


KEYS: dict[str, Key] = dict(walk())
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)  # the loader's base config (a fresh copy of every default)
OPEN_KEYS = frozenset(name for name, key in KEYS.items() if key.open)
KEY_RULES: dict[str, Rule] = {
    name: rule for name, key in KEYS.items() if (rule := key.rule or _inferred(key.default)) is not None
}
# Keys given on the command line whose value is a name, never a number (`encode.sizes=0x32` is a size,
# not hex 50): their overrides are taken as the literal text.
TEXT_OVERRIDES = frozenset(name for name, rule in KEY_RULES.items() if rule.literal)


def validate_config(cfg) -> None:
    """Check every typed key of a loaded `cfg` against its rule (in place: values are normalised, e.g. a
    whole number given for a float key becomes a float). One line names the first bad key."""
    for name, rule in KEY_RULES.items():
        value = OmegaConf.select(cfg, name)
        checked = rule.check(value, name)
        if checked is not value:
            with open_dict(cfg):
                OmegaConf.update(cfg, name, checked, merge=False)


# ---------------------------------------------------------------- the key reference (docs/configuration.md)

REFERENCE = Path("docs/configuration.md")
_INTRO = """\
# Configuration keys

Every key a config file (or a `key=value` override) may set, with its default, what it accepts and
what it means. This file is generated from the schema, `retrieval/schema.py`, which is the one place
a key's default, type, range and meaning are stated: edit the schema, then write this file again
(`.venv/bin/python -c "from retrieval.schema import write_reference; write_reference()"`);
`tests/test_config.py` fails while the two differ.

A config is these defaults, overlaid by the YAML file (which may name a `base:` file it extends,
relative to itself), overlaid by `key=value` command-line overrides (OmegaConf dotlist syntax;
`${other.key}` interpolates). An unknown key is an error naming the nearest valid key; a value of
the wrong type or range is one line naming the key. A key of an open mapping (marked *open*)
is the user's own name; a config's open mapping replaces the default one, and `name=null` drops
an inherited entry. Names stay text on the command line (`encode.sizes=0x32` is a size, not hex).
"""


def _cell(text: str) -> str:
    """Text for a table cell: `|` escaped, and `<` outside code spans (`<size>` is not an HTML tag)."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else re.sub(r"<(?=\w)", r"\\<", p) for i, p in enumerate(parts))


def _shown(default) -> str:
    """A default as YAML writes it, on one line."""
    return f"`{yaml.safe_dump(default, default_flow_style=True, sort_keys=False, width=10**6).splitlines()[0]}`"


def _accepts(key: Key) -> str:
    rule = key.rule or _inferred(key.default)
    if rule is not None:
        return rule.accepts
    if key.open:
        return "a mapping (*open*)"
    return {str: "text", list: "a list", dict: "a mapping"}.get(type(key.default), "any")


def reference_markdown() -> str:
    """docs/configuration.md: the intro, then one table per section (the top-level keys first)."""
    out = [_INTRO]
    sections = [("top level", {k: v for k, v in SCHEMA.items() if isinstance(v, Key)}, "")]
    sections += [(f"`{name}`", entry, f"{name}.") for name, entry in SCHEMA.items() if not isinstance(entry, Key)]
    for title, entries, prefix in sections:
        out += [f"## {title}", "", "| key | default | accepts | meaning |", "|---|---|---|---|"]
        for name, key in walk(entries, prefix):
            out.append(f"| `{name}` | {_cell(_shown(key.default))} | {_cell(_accepts(key))} | {_cell(key.doc)} |")
        out.append("")
    return "\n".join(out)


def write_reference(path: Path | str = REFERENCE) -> Path:
    """Write the key reference (run from the repository root)."""
    Path(path).write_text(reference_markdown())
    return Path(path)
