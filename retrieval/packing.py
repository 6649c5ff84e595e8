"""Packed (unpadded) batches: all real tokens of a batch as one sequence, attention restricted to each text.

`PackedBatch.from_padded` flattens a padded `(B, L)` batch to its `T` real tokens, with cumulative
lengths `cu_seqlens` (`B + 1`) and position ids that restart at each text. `packed_hidden_states`
runs the backbone's own embedding and layer modules on that `(1, T, H)` sequence, as deep as the
deepest requested layer; the layers' attention goes through transformers' attention interface
(`AttentionInterface`, registered here as `PACKED_ATTENTION`), which calls a variable-length kernel:

- `flash_attn`: `flash_attn_varlen_func` (CUDA, when flash-attn is installed; attention dropout too),
- `varlen`: `torch.nn.attention.varlen.varlen_attn` (CUDA, PyTorch >= 2.10; no dropout argument, so
  a training step with attention dropout uses `padded` instead),
- `padded`: the reference on any device, and the CPU path: each layer's q/k/v are scattered into a
  `(B, L)` grid for one SDPA call with a key-padding mask, then gathered back, so only attention
  sees padding (the projections, feed-forward and norms, most of the work, see the real tokens only).

Only BERT-family backbones (`PACKABLE`: absolute positions, the embedding module taking
`position_ids`) are packed; others run padded (`model.packing` says so once).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass

import torch
from torch import nn

PACKED_ATTENTION = "starbucks_packed"
PACKABLE = ("bert",)  # config.model_type of the backbones the packed path supports
PACKING_VALUES = ("auto", True, False)


@dataclass
class PackedBatch:
    """The real tokens of a padded batch, text after text."""

    input_ids: torch.Tensor  # (T,)
    token_type_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (T,), restarting at 0 for each text
    cu_seqlens: torch.Tensor  # (B + 1,) int32: text i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    lengths: torch.Tensor  # (B,)
    max_length: int  # the longest text (a host int: the kernels take it as one)
    flat_index: torch.Tensor  # (T,): each token's position in the flattened (B, L) padded grid
    width: int  # L

    @classmethod
    def from_padded(cls, batch) -> "PackedBatch":
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(1)
        flat_index = mask.flatten().nonzero().squeeze(1)  # row-major: each text's tokens in order
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lengths.cumsum(0)
        starts = cu[:-1].long().repeat_interleave(lengths)
        positions = torch.arange(len(flat_index), device=mask.device) - starts
        types = batch.get("token_type_ids")
        types = types.flatten()[flat_index] if types is not None else torch.zeros_like(flat_index)
        return cls(batch["input_ids"].flatten()[flat_index], types, positions, cu, lengths,
                   int(lengths.max()), flat_index, mask.shape[1])

    @property
    def texts(self) -> int:
        return len(self.lengths)

    def pool(self, states: torch.Tensor, pooling: str) -> torch.Tensor:
        """`(B, H')` from packed states `(T, H')`: each text's first token (cls) or the mean of its tokens."""
        if pooling == "cls":
            return states[self.cu_seqlens[:-1].long()]
        text_of_token = torch.arange(self.texts, device=states.device).repeat_interleave(self.lengths)
        sums = states.new_zeros(self.texts, states.shape[1]).index_add_(0, text_of_token, states)
        return sums / self.lengths.unsqueeze(1).to(states.dtype)


# ------------------------------------------------------------ kernels


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def pick_kernel(device: torch.device, dropout: float) -> str:
    """The fastest exact kernel for packed attention on `device` with attention dropout `dropout`."""
    if device.type == "cuda":
        if flash_attn_available():
            return "flash_attn"
        if torch_varlen_available() and dropout == 0.0:
            return "varlen"
    return "padded"


def fast_kernel_available(device: torch.device) -> bool:
    """`model.packing: auto` packs where a variable-length kernel exists (CUDA with flash-attn or PyTorch's)."""
    return pick_kernel(device, 0.0) != "padded"


def _padded_attention(q, k, v, packed: PackedBatch, scaling: float, dropout: float) -> torch.Tensor:
    """Reference: scatter `(T, heads, d)` into the `(B, L)` grid, one masked SDPA call, gather back."""
    grid = packed.texts * packed.width

    def to_grid(x):
        full = x.new_zeros(grid, *x.shape[1:]).index_copy(0, packed.flat_index, x)
        return full.view(packed.texts, packed.width, *x.shape[1:]).transpose(1, 2)  # (B, heads, L, d)

    keep = torch.zeros(grid, dtype=torch.bool, device=q.device)
    keep[packed.flat_index] = True
    out = nn.functional.scaled_dot_product_attention(
        to_grid(q), to_grid(k), to_grid(v), attn_mask=keep.view(packed.texts, 1, 1, packed.width),
        dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).reshape(grid, *q.shape[1:])[packed.flat_index]


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed=None, **_):
    """An `AttentionInterface` function: `query/key/value` are `(1, heads, T, d)`; returns `(1, T, heads, d)`."""
    if packed is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention is only for packed batches (retrieval.packing)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, d)
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    kernel = pick_kernel(q.device, dropout)
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_length,
                                     packed.max_length, dropout_p=dropout, softmax_scale=scaling)
    elif kernel == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_length, packed.max_length,
                          scale=scaling)
    else:
        out = _padded_attention(q, k, v, packed, scaling, dropout)
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


_register()


# ------------------------------------------------------------ the packed forward


def check_packing(value):
    """`model.packing`: auto | true | false."""
    from retrieval.errors import StarbucksError

    if value in PACKING_VALUES:
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "auto"):
        return {"true": True, "false": False, "auto": "auto"}[value.strip().lower()]
    raise StarbucksError(f"model.packing = {value!r} must be auto, true or false")


def supports_packing(backbone: nn.Module) -> bool:
    return getattr(backbone.config, "model_type", None) in PACKABLE and hasattr(backbone, "embeddings")


_warned: set[str] = set()


def use_packing(setting, backbone: nn.Module, device: torch.device) -> bool:
    """Whether a batch on `device` runs packed under `model.packing = setting`."""
    if setting is False:
        return False
    if not supports_packing(backbone):
        kind = str(getattr(backbone.config, "model_type", type(backbone).__name__))
        if setting is True and kind not in _warned:
            _warned.add(kind)
            warnings.warn(f"model.packing = true: the packed path supports {', '.join(PACKABLE)} backbones, "
                          f"not {kind}; running padded batches", stacklevel=3)
        return False
    return setting is True or fast_kernel_available(device)


def packed_hidden_states(backbone: nn.Module, layers: nn.ModuleList, batch, wanted: list[int]):
    """`(PackedBatch, {layer: (T, H) states})` for the requested layers (1-based), no deeper than needed."""
    packed = PackedBatch.from_padded(batch)
    hidden = backbone.embeddings(input_ids=packed.input_ids[None], token_type_ids=packed.token_type_ids[None],
                                 position_ids=packed.position_ids[None])
    config = backbone.config
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ATTENTION
    states = {}
    try:
        for n, layer in enumerate(layers[:wanted[-1]], start=1):
            out = layer(hidden, None, packed=packed)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if n in wanted:
                states[n] = hidden[0]
    finally:
        config._attn_implementation = previous
    return packed, states
