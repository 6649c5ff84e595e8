"""Settings in one place: devices, precisions, `auto`, and the whole-number check the schema's rules use.

Each typed config key is checked (and normalised) against the schema, `retrieval.schema`, when a
config is loaded; the stages then read plain values. Devices (`resolve_device`) and precisions
(`resolve_precision`, `autocast_context`, `accelerate_precision`) mean the same thing in every stage.
"""

from __future__ import annotations

import contextlib
import os
from typing import Mapping

import torch

from retrieval.errors import StarbucksError

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
