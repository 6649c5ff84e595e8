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
  `(B, longest text)` grid for one SDPA call with a key-padding mask, then gathered back, so only attention
  sees padding (the projections, feed-forward and norms, most of the work, see the real tokens only).
  On the CPU the texts are first put in groups of similar length (`PackedBatch.attention_groups`: at
  most `GROUP_TEXTS` texts, a grid at most `GROUP_WASTE` above its texts' own (query, key) pairs), one
  grid and one SDPA call per group: a batch's grid over its longest text held ~3x the pairs of its texts
  on debian-pkgs passages, and attention (with its dropout mask when training) is the part of a CPU
  step that grows with it. With attention dropout in a model whose dropout the trainer made
  `retrieval.dropout`'s (`train.dropout_masks`), a group runs SDPA's fp32 math path written out
  (`_math_attention`) with those masks. Compiled layers keep the one grid and PyTorch's dropout.

`model.packing: auto` packs where that was measured faster than padded batches (`auto_packs`): on the
CPU (fp32 and bf16) and on CUDA with a variable-length kernel. Only BERT-family backbones
(`PACKABLE`: absolute positions, the embedding module taking `position_ids`) are packed; others
run padded (`model.packing` says so once).
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from retrieval.dropout import Dropout, dropout as numpy_dropout

PACKED_ATTENTION = "starbucks_packed"
PACKABLE = ("bert",)  # config.model_type of the backbones the packed path supports
GROUP_TEXTS = 8  # attention groups (the CPU's padded kernel): at most this many texts per grid
GROUP_WASTE = 0.2  # and a grid's (query, key) pairs at most 20% above those of its texts


def bucket(tokens: int, minimum: int = 256) -> int:
    """`tokens` rounded up to a few shapes: 4 per power of two (`2^j x 1, 1.25, 1.5, 1.75`), at least
    `minimum`; at most 25% more tokens (about 10% on average), 35 shapes from 256 to 100k tokens."""
    if tokens <= minimum:
        return minimum
    step = 1 << max(0, tokens.bit_length() - 3)  # a quarter of the power of two below `tokens`
    return -(-tokens // step) * step


@dataclass(frozen=True)
class AttentionGroup:
    """Texts of similar length whose attention runs as one `(texts, length)` grid."""

    tokens: torch.Tensor  # (T_g,): the group's tokens' places in the packed sequence, text after text
    texts: int
    length: int  # the group's longest text: the grid's width
    flat_index: torch.Tensor  # (T_g,): each token's place in the grid, row-major
    mask: torch.Tensor | None  # (texts, 1, 1, length): the places holding a token (None: no padding)


def group_texts(lengths: list[int], most: int = GROUP_TEXTS, waste: float = GROUP_WASTE) -> list[list[int]]:
    """Segment indices in groups of similar length: longest first, a group closed when one more text
    would make it hold more than `most` texts or its grid (texts x longest^2 pairs) more than
    `1 + waste` times its texts' own pairs."""
    groups: list[list[int]] = []
    group: list[int] = []
    pairs = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        grid = (len(group) + 1) * lengths[group[0]] ** 2 if group else 0
        if group and (len(group) >= most or grid > (1 + waste) * (pairs + lengths[i] ** 2)):
            groups.append(group)
            group, pairs = [], 0
        group.append(i)
        pairs += lengths[i] ** 2
    return groups + [group] if group else groups


@dataclass
class PackedBatch:
    """The real tokens of a padded batch, text after text (then, when bucketed, filler texts)."""

    input_ids: torch.Tensor  # (T,)
    token_type_ids: torch.Tensor  # (T,)
    position_ids: torch.Tensor  # (T,), restarting at 0 for each text
    cu_seqlens: torch.Tensor  # (B' + 1,) int32: segment i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    lengths: torch.Tensor  # (B',): the texts', then the filler's
    max_length: int  # >= the longest segment (a host int: the kernels take it as one)
    flat_index: torch.Tensor  # (T,): each token's place in a (B', max_length) grid, row-major
    texts: int  # B: the batch's texts (the first B of the B' segments; the others are filler)
    tokens: int  # the texts' tokens (the first `tokens` of the T)

    @classmethod
    def from_padded(cls, batch, buckets: bool = False) -> "PackedBatch":
        """`buckets`: few shapes for compiled layers: the token count rounded up (`bucket`) with filler
        texts of pad tokens no longer than the longest text, and `max_length` rounded up to a multiple
        of 32; the filler's states are never pooled."""
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(1)
        real = mask.flatten().nonzero().squeeze(1)  # row-major: each text's tokens in order
        ids = batch["input_ids"].flatten()[real]
        types = batch.get("token_type_ids")
        types = types.flatten()[real] if types is not None else torch.zeros_like(real)
        texts, tokens, longest = len(lengths), len(real), int(lengths.max())
        filler = bucket(tokens) - tokens if buckets else 0
        if filler:
            rows = -(-filler // longest)
            fill = torch.full((rows,), longest, dtype=lengths.dtype, device=mask.device)
            fill[-1] = filler - longest * (rows - 1)
            lengths = torch.cat([lengths, fill])
            ids = torch.cat([ids, ids.new_zeros(filler)])
            types = torch.cat([types, types.new_zeros(filler)])
        max_length = -(-longest // 32) * 32 if buckets else longest
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lengths.cumsum(0)
        segment = torch.arange(len(lengths), device=mask.device).repeat_interleave(lengths)
        positions = torch.arange(len(ids), device=mask.device) - cu[:-1].long()[segment]
        return cls(ids, types, positions, cu, lengths, max_length, segment * max_length + positions, texts, tokens)

    @property
    def segments(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def grid_mask(self) -> torch.Tensor:
        """`(B', 1, 1, max_length)`: which places of the grid hold a token (SDPA's key mask)."""
        keep = torch.zeros(self.segments * self.max_length, dtype=torch.bool, device=self.flat_index.device)
        keep[self.flat_index] = True
        return keep.view(self.segments, 1, 1, self.max_length)

    @functools.cached_property
    def attention_groups(self) -> tuple[list[AttentionGroup], torch.Tensor]:
        """The segments in groups of similar length (`group_texts`), and the order of the tokens when
        the groups' tokens are put one after the other (`(T,)`, a permutation of the packed places)."""
        lengths = self.lengths.tolist()
        starts = self.cu_seqlens.tolist()
        device = self.flat_index.device
        groups = []
        for members in group_texts(lengths):
            width = lengths[members[0]]
            tokens = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in members])
            flat = torch.cat([torch.arange(lengths[i], device=device) + row * width for row, i in enumerate(members)])
            mask = None
            if any(lengths[i] != width for i in members):
                keep = torch.zeros(len(members) * width, dtype=torch.bool, device=device)
                keep[flat] = True
                mask = keep.view(len(members), 1, 1, width)
            groups.append(AttentionGroup(tokens, len(members), width, flat, mask))
        return groups, torch.cat([g.tokens for g in groups])

    def pool(self, states: torch.Tensor, pooling: str) -> torch.Tensor:
        """`(B, H')` from packed states `(T, H')`: each text's first token (cls) or the mean of its tokens."""
        if pooling == "cls":
            return states[self.cu_seqlens[: self.texts].long()]
        lengths = self.lengths[: self.texts]
        text_of_token = torch.arange(self.texts, device=states.device).repeat_interleave(lengths)
        sums = states.new_zeros(self.texts, states.shape[1]).index_add_(0, text_of_token, states[: self.tokens])
        return sums / lengths.unsqueeze(1).to(states.dtype)


# ------------------------------------------------------------ kernels


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def pick_kernel(device: torch.device, dropout: float, dtype: torch.dtype = torch.bfloat16) -> str:
    """The fastest exact kernel for packed attention on `device` with attention dropout `dropout` (the
    variable-length kernels take fp16/bf16 only: fp32 attention uses the reference)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        if flash_attn_available():
            return "flash_attn"
        if torch_varlen_available() and dropout == 0.0:
            return "varlen"
    return "padded"


def fast_kernel_available(device: torch.device) -> bool:
    """Whether a variable-length attention kernel exists on `device` (CUDA with flash-attn or PyTorch's)."""
    return pick_kernel(device, 0.0) != "padded"


def auto_packs(device: torch.device) -> bool:
    """`model.packing: auto`: packed where it was measured faster than padded. On CUDA where a
    variable-length kernel exists; on the CPU always, in fp32 and bf16 alike (the linear layers and
    the FFN see only real tokens, attention runs on the grid: an SRL step and encoding ~1.3-1.6x
    faster on 2 cores, docs/benchmarks.md)."""
    return device.type == "cpu" or fast_kernel_available(device)


def _padded_attention(q, k, v, packed: PackedBatch, scaling: float, dropout: float) -> torch.Tensor:
    """Reference: scatter `(T, heads, d)` into the `(B', max_length)` grid, one masked SDPA call, gather back."""
    grid = packed.segments * packed.max_length

    def to_grid(x):
        full = x.new_zeros(grid, *x.shape[1:]).index_copy(0, packed.flat_index, x)
        return full.view(packed.segments, packed.max_length, *x.shape[1:]).transpose(1, 2)  # (B', heads, L, d)

    out = nn.functional.scaled_dot_product_attention(
        to_grid(q), to_grid(k), to_grid(v), attn_mask=packed.grid_mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).reshape(grid, *q.shape[1:])[packed.flat_index]


def _math_attention(q, k, v, mask, scaling: float, dropout: float) -> torch.Tensor:
    """Attention with dropout on the probabilities as SDPA's math path computes it on the CPU (in fp32, the
    inputs' dtype out; PyTorch's CPU kernels have no dropout), its masks from `retrieval.dropout`."""
    with torch.autocast("cpu", enabled=False):
        scores = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(scaling)
        if mask is not None:  # key padding (the rows of padding places give NaN or junk: never gathered back)
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = numpy_dropout(scores.softmax(-1), dropout)
        return torch.matmul(probs, v.float()).to(q.dtype)


def _grouped_attention(
    q, k, v, packed: PackedBatch, scaling: float, dropout: float, numpy_masks: bool = False
) -> torch.Tensor:
    """`_padded_attention` one group of similar-length texts at a time (`PackedBatch.attention_groups`);
    `numpy_masks`: attention dropout with `retrieval.dropout`'s masks (`_math_attention`), else SDPA's."""
    groups, order = packed.attention_groups
    outs = []
    for g in groups:

        def to_grid(x, g=g):
            full = x.new_zeros(g.texts * g.length, *x.shape[1:]).index_copy(
                0, g.flat_index, x.index_select(0, g.tokens)
            )
            return full.view(g.texts, g.length, *x.shape[1:]).transpose(1, 2)  # (texts, heads, L, d)

        if dropout > 0.0 and numpy_masks:
            out = _math_attention(to_grid(q), to_grid(k), to_grid(v), g.mask, scaling, dropout)
        else:
            out = nn.functional.scaled_dot_product_attention(
                to_grid(q), to_grid(k), to_grid(v), attn_mask=g.mask, dropout_p=dropout, scale=scaling
            )
        outs.append(out.transpose(1, 2).reshape(g.texts * g.length, *q.shape[1:])[g.flat_index])
    out = torch.cat(outs)  # (SDPA under autocast may give another dtype than q's)
    return out.new_empty(out.shape).index_copy(0, order, out)


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed=None, **_):
    """An `AttentionInterface` function: `query/key/value` are `(1, heads, T, d)`; returns `(1, T, heads, d)`."""
    if packed is None:
        raise RuntimeError(f"{PACKED_ATTENTION} attention is only for packed batches (retrieval.packing)")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, d)
    scaling = scaling if scaling is not None else q.shape[-1] ** -0.5
    kernel = pick_kernel(q.device, dropout, q.dtype)
    if kernel == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            q,
            k,
            v,
            packed.cu_seqlens,
            packed.cu_seqlens,
            packed.max_length,
            packed.max_length,
            dropout_p=dropout,
            softmax_scale=scaling,
        )
    elif kernel == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(
            q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_length, packed.max_length, scale=scaling
        )
    elif q.device.type == "cpu" and not torch.compiler.is_compiling():
        # NumPy-drawn attention dropout where the trainer put retrieval.dropout in the model (train.dropout_masks)
        out = _grouped_attention(
            q, k, v, packed, scaling, dropout, isinstance(getattr(module, "dropout", None), Dropout)
        )
    else:
        out = _padded_attention(q, k, v, packed, scaling, dropout)
    return out.unsqueeze(0), None


@functools.cache
def _register() -> None:
    """Register `packed_attention` with transformers (once, at the first packed batch)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)


# ------------------------------------------------------------ the packed forward


def check_packing(value):
    """`model.packing`: auto | true | false."""
    from retrieval.errors import StarbucksError

    if value == "auto" or isinstance(value, bool):
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
            warnings.warn(
                f"model.packing = true: the packed path supports {', '.join(PACKABLE)} backbones, "
                f"not {kind}; running padded batches",
                stacklevel=3,
            )
        return False
    return setting is True or auto_packs(device)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, packed: PackedBatch, config) -> torch.Tensor:
    """One layer on the packed sequence, its attention through `PACKED_ATTENTION`; under gradient
    checkpointing the layer is checkpointed here, so that its re-run in the backward pass (outside
    this forward) also attends per text."""

    def run(h):
        previous, config._attn_implementation = config._attn_implementation, PACKED_ATTENTION
        checkpointing, layer.gradient_checkpointing = getattr(layer, "gradient_checkpointing", False), False
        try:
            out = layer(h, None, packed=packed)
        finally:
            config._attn_implementation, layer.gradient_checkpointing = previous, checkpointing
        return out[0] if isinstance(out, (tuple, list)) else out

    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(run, hidden)
    return run(hidden)


def packed_hidden_states(backbone: nn.Module, layers: nn.ModuleList, batch, wanted: list[int], buckets: bool = False):
    """`(PackedBatch, {layer: (T, H) states})` for the requested layers (1-based), no deeper than needed;
    `buckets`: the token count rounded up to a few shapes (for compiled layers, `PackedBatch.from_padded`)."""
    _register()
    packed = PackedBatch.from_padded(batch, buckets)
    hidden = backbone.embeddings(
        input_ids=packed.input_ids[None],
        token_type_ids=packed.token_type_ids[None],
        position_ids=packed.position_ids[None],
    )
    states = {}
    for n, layer in enumerate(layers[: wanted[-1]], start=1):
        hidden = _run_layer(layer, hidden, packed, backbone.config)
        if n in wanted:
            states[n] = hidden[0]
    return packed, states
