"""Settings in one place: typed config keys checked against the schema, devices, precisions, `auto`.

`validate_config(cfg)` checks (and normalises) every typed key of a loaded config: a key whose
schema default is a bool, a whole number or a number must hold one, and the keys listed in
`KEY_RULES` follow their rule (choices, ranges, `auto`-or-number, names that stay strings). The
stages then read plain values. Devices (`resolve_device`) and precisions (`resolve_precision`,
`autocast_context`, `accelerate_precision`) mean the same thing in every stage.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from retrieval.errors import StarbucksError
from retrieval.samplers import FINETUNE_METHODS

# ---------------------------------------------------------------- small helpers


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def whole_number(value, key: str, minimum: int = 0, allow_none: bool = False, auto: bool = False):
    """`value` as an int >= `minimum` (whole floats and digit strings accepted); `None` where
    `allow_none`, and the string `auto` kept as it is where `auto`."""
    if (allow_none and value is None) or (auto and value == "auto"):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        forms = (["auto"] if auto else []) + (["null"] if allow_none else []) + [f"a whole number >= {minimum}"]
        raise StarbucksError(f"{key} = {value!r} must be {' or '.join(forms)}")
    return value


# ---------------------------------------------------------------- devices and precisions

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def local_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's index on its machine (torchrun `LOCAL_RANK` or srun `SLURM_LOCALID`)."""
    return int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))


def resolve_device(spec, key: str = "device", env: Mapping[str, str] = os.environ) -> torch.device:
    """`auto`: this rank's GPU (by its local rank) when CUDA is available, else the CPU; `cpu`, `cuda`,
    `cuda:N` as given (a CUDA device without CUDA is one clear line)."""
    spec = str(spec or "auto").strip()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank(env) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise StarbucksError(f"{key} = {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StarbucksError(f"{key} = {spec!r} but CUDA is not available; use {key}=cpu (or auto)")
    return device


CPU_BF16_ENV = "STARBUCKS_CPU_BF16"  # 0: `auto` is fp32 on every CPU; 1: bf16 on every CPU; unset: by the chip


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16), by torch's own probe."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cpu_bf16(env: Mapping[str, str] = os.environ) -> bool:
    """Whether `auto` means bf16 autocast on the CPU: where the chip has native bf16, unless
    `STARBUCKS_CPU_BF16` says otherwise (`0`: fp32, as on a chip without it; `1`: bf16 even there)."""
    forced = env.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise StarbucksError(f"{CPU_BF16_ENV}={forced!r} must be 0 (fp32 on the CPU), 1 (bf16) or unset (by the chip)")
    return cpu_has_native_bf16()


def resolve_precision(
    value, device: torch.device, key: str, gpu_default: str = "fp16", cpu_fp16: bool = True, cpu_auto_bf16: bool = True
) -> str:
    """`fp32`, `fp16` or `bf16` for a precision key. `auto` is `gpu_default` on a GPU (inference
    defaults to fp16, training to bf16 where the GPU has it); on the CPU bf16 autocast where the chip
    has native bf16 (`cpu_bf16`: AVX512-BF16 or AMX; `cpu_auto_bf16=False` for a key that has no
    bf16, such as search's matmul), fp32 elsewhere. `cpu_fp16=False` refuses fp16 on the CPU
    (training: no loss scaling there)."""
    value = _PRECISION_ALIASES.get(str(value), str(value))
    if value == "auto":
        if device.type == "cuda":
            if gpu_default == "bf16" and not torch.cuda.is_bf16_supported():
                return "fp16"
            return gpu_default
        return "bf16" if device.type == "cpu" and cpu_auto_bf16 and cpu_bf16() else "fp32"
    if value not in PRECISIONS:
        raise StarbucksError(f"{key} = {value!r} is not one of auto, {', '.join(PRECISIONS)}")
    if value == "fp16" and device.type == "cpu" and not cpu_fp16:
        raise StarbucksError(f"{key}=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return value


def autocast_context(device: torch.device, precision: str):
    """Autocast to a resolved precision (`fp32`: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def accelerate_precision(precision: str) -> str:
    """accelerate's `mixed_precision` name for a resolved precision."""
    return {"fp32": "no"}.get(precision, precision)


# ---------------------------------------------------------------- typed config keys


@dataclass(frozen=True)
class Rule:
    """How one config key is checked: `check(value, key) -> normalised value` (raises one line).
    `literal`: the key holds names, so a command-line value is taken as text, never parsed as a number."""

    check: Callable[[Any, str], Any]
    literal: bool = False


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: bool = False,
    below: bool = False,
    allow_none: bool = False,
) -> Rule:
    """A real number (whole numbers and numeric strings accepted) within the bounds."""

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
            lo = "" if minimum is None else f"{'>' if above else '>='} {minimum}"
            hi = "" if maximum is None else f"{'<' if below else '<='} {maximum}"
            raise StarbucksError(f"{key} = {value!r} must be {' and '.join(p for p in (lo, hi) if p)}")
        return float(x)

    return Rule(check)


def integer(minimum: int = 0, *, auto: bool = False, allow_none: bool = False) -> Rule:
    """A whole number >= `minimum` (or `auto` / null where allowed, kept as given)."""
    return Rule(lambda value, key: whole_number(value, key, minimum, allow_none=allow_none, auto=auto))


def boolean() -> Rule:
    def check(value, key):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise StarbucksError(f"{key} = {value!r} must be true or false")

    return Rule(check)


def choice(*options, allow_none: bool = False) -> Rule:
    def check(value, key):
        if value is None and allow_none:
            return None
        if value not in options:
            raise StarbucksError(f"{key} = {value!r} is not one of {', '.join(map(str, options))}")
        return value

    return Rule(check)


def text(allow_none: bool = True) -> Rule:
    """A string (names, paths); a number here was almost surely mis-parsed (`0x32` is hex 50)."""

    def check(value, key):
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise StarbucksError(f"{key} = {value!r} must be text; quote it in YAML ('{value}')")
        return value

    return Rule(check, literal=True)


def names() -> Rule:
    """A selection of names: `all`, a comma list, or a YAML list of names (kept as strings)."""

    def check(value, key):
        if isinstance(value, Sequence) and not isinstance(value, str):  # a list, or a YAML list (ListConfig)
            bad = [v for v in value if not isinstance(v, str)]
            if bad:
                raise StarbucksError(f"{key} holds {bad[0]!r}, not a name; quote it in YAML ('{bad[0]}')")
            return value
        return text(allow_none=True).check(value, key)

    return Rule(check, literal=True)


def _packing_setting(value):
    from retrieval.packing import check_packing  # the packed path's own check

    return check_packing(value)


# Keys whose rule is not implied by their default (None, auto, a choice, a range, names).
KEY_RULES: dict[str, Rule] = {
    "seed": integer(0),
    "model.pooling": choice("cls", "mean"),
    "model.packing": Rule(lambda v, k: _packing_setting(v)),
    "model.query_max_length": integer(1),
    "model.passage_max_length": integer(1),
    "data.max_train_groups": integer(1, allow_none=True),
    "data.train_corpus": text(),
    "train.method": choice(*FINETUNE_METHODS, "smae"),
    "train.size": text(),
    "train.epochs": number(0, above=True),
    "train.max_steps": integer(1, allow_none=True),
    "train.batch_size": integer(1),
    "train.group_size": integer(1),
    "train.grad_accum": integer(1),
    "train.learning_rate": number(0, above=True),
    "train.weight_decay": number(0),
    "train.warmup_ratio": number(0, 1, below=True),
    "train.max_grad_norm": number(0, above=True, allow_none=True),
    "train.temperature": number(0, above=True),
    "train.kl_weight": number(0),
    "train.kl_temperature": number(0, above=True),
    "train.precision": choice("auto", "bf16", "fp16", "fp32"),
    "train.length_buckets": integer(1, auto=True),
    "train.save_steps": integer(1),
    "train.save_total_limit": integer(0, allow_none=True),
    "train.logging_steps": integer(1),
    "train.dataloader_workers": integer(0),
    "train.twodmse_dims": choice("uniform", "list"),
    "train.grad_cache_chunk": integer(1),
    "train.eval_steps": integer(1, allow_none=True),
    "train.eval_split": text(allow_none=False),
    "train.holdout_queries": integer(0),
    "train.eval_queries": integer(1, allow_none=True),
    "train.eval_metric": text(allow_none=False),
    "train.eval_candidates": Rule(lambda v, k: v if v in ("auto", "corpus") else whole_number(v, k, 1)),
    "train.keep_best": text(),
    "train.early_stopping_patience": integer(1, allow_none=True),
    "train.report_to": text(allow_none=False),
    "pretrain.max_length": integer(8),
    "pretrain.enc_mask_ratio": number(0, 1),
    "pretrain.dec_mask_ratio": number(0, 1),
    "pretrain.decoder_layers": integer(1),
    "pretrain.max_texts": integer(1, allow_none=True),
    "pretrain.max_tokens": integer(1, allow_none=True),
    "pretrain.mask_replace": choice("bert", "mask"),
    "encode.model": text(),
    "encode.sizes": names(),
    "encode.splits": names(),
    "encode.batch_size": integer(1),
    "encode.shard_rows": integer(1),
    "encode.precision": choice("auto", "fp32", "fp16", "bf16"),
    "encode.dataloader_workers": integer(0, auto=True),
    "encode.shard": text(),
    "encode.parallel_parts": Rule(lambda v, k: v if v == "auto" else boolean().check(v, k)),
    "search.depth": integer(1),
    "search.batch_size": integer(1),
    "search.backend": choice("auto", "faiss", "torch"),
    "search.sizes": names(),
    "search.splits": names(),
    "search.train_rows": integer(1),
    "search.shards_per_index": integer(1, allow_none=True),
    "search.torch_dtype": choice("auto", "fp16", "fp32", "float16", "float32"),
    "search.topk_block": Rule(lambda v, k: v if v == 0 else whole_number(v, k, 2, allow_none=True, auto=True)),
    "eval.rel_level": integer(0),
    "eval.baseline": text(),
    "eval.sizes": names(),
    "eval.splits": names(),
    "eval.alpha": number(0, 1, above=True, below=True),
    "experiment.methods": names(),
    "experiment.seeds": Rule(
        lambda v, k: (
            v
            if v is None
            else [
                whole_number(x, f"{k}[{i}]", 0)
                for i, x in enumerate(v if isinstance(v, Sequence) and not isinstance(v, str) else [v])
            ]
        )
    ),
    "experiment.hybrids": names(),
    "experiment.grid_split": text(allow_none=False),
    "experiment.run_depth": integer(1),
    "experiment.grid_run_depth": integer(1),
}

# Keys given on the command line whose value is a name, never a number (`encode.sizes=0x32` is a size,
# not hex 50): their overrides are taken as the literal text.
TEXT_OVERRIDES = frozenset(k for k, r in KEY_RULES.items() if r.literal)


def _inferred(default) -> Rule | None:
    """The rule a default implies: a bool, whole number or number key keeps its type."""
    if isinstance(default, bool):
        return boolean()
    if isinstance(default, int):
        return integer(-(2**63))
    if isinstance(default, float):
        return number()
    return None


def _walk(schema: Mapping, open_keys, prefix: str = ""):
    for key, default in schema.items():
        full = f"{prefix}{key}"
        if isinstance(default, dict) and full not in open_keys:
            yield from _walk(default, open_keys, full + ".")
        elif full not in open_keys:
            yield full, default


def validate_config(cfg, schema: Mapping, open_keys=()) -> None:
    """Check every typed key of `cfg` against its rule (in place: values are normalised, e.g. a
    whole number given for a float key becomes a float). One line names the first bad key."""
    from omegaconf import OmegaConf, open_dict

    for key, default in _walk(schema, set(open_keys)):
        rule = KEY_RULES.get(key) or _inferred(default)
        if rule is None:
            continue
        value = OmegaConf.select(cfg, key)
        checked = rule.check(value, key)
        if checked is not value:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, checked, merge=False)
