"""The sub-size encoder (the nn.Module): one HF encoder, an embedding for every `(layers, dim)` size.

`StarbucksEncoder.embed(batch, sizes)` runs the backbone only as deep as the deepest
requested size (early exit: the layer list is cut for the call), pools the hidden states of
each requested layer (CLS or mean), keeps the first `dim` dimensions and optionally
L2-normalises them. Loading and saving it (the checkpoint directory: a plain HF model plus
`starbucks.json`, the sentence-transformers files and the card) is `retrieval.checkpoint`.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from retrieval.errors import StarbucksError
from retrieval.packing import check_packing, packed_hidden_states, use_packing
from retrieval.sizes import Size, check_size

POOLINGS = ("cls", "mean")
# length_buckets = 0: one sub-batch per this many padded tokens (on an H100, 128 x 8 BERT-base passages
# of <= 196 tokens ran fastest as 2 sub-batches; smaller batches as one: docs/benchmarks.md)
BUCKET_TOKENS = 131072

# Where HF encoders keep their list of transformer layers.
_LAYER_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "layers")
# Where encoders keep the norm they apply after their last layer (ModernBERT, XLM-RoBERTa-XL); BERT,
# RoBERTa, XLM-R, DistilBERT, ELECTRA and MPNet have none.
_FINAL_NORM_PATHS = ("final_norm", "encoder.LayerNorm")
# Config lists as long as the layer list that are not one entry per layer.
_NOT_PER_LAYER = ("architectures",)


def _layer_holder(model: nn.Module) -> tuple[nn.Module, str]:
    for path in _LAYER_PATHS:
        parent = model
        *heads, last = path.split(".")
        try:
            for h in heads:
                parent = getattr(parent, h)
            layers = getattr(parent, last)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return parent, last
    raise StarbucksError(
        f"cannot find the transformer layer list of {type(model).__name__}; supported: BERT-style encoders "
        f"with one of {', '.join(_LAYER_PATHS)}"
    )


def _final_norm(model: nn.Module) -> nn.Module | None:
    for path in _FINAL_NORM_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _per_layer(key: str) -> bool:
    return key not in _NOT_PER_LAYER and not key.endswith(("_token_id", "_token_ids"))


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class StarbucksEncoder(nn.Module):
    """Wraps an HF encoder; gives one embedding per requested size, with early exit."""

    def __init__(self, backbone: nn.Module, pooling: str = "cls", normalize: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise StarbucksError(f"model.pooling = {pooling!r} is not one of {POOLINGS}")
        self.backbone = backbone
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.length_buckets = 1  # `embed`: sub-batches by length, 0: by token count (train.length_buckets)
        self.packing = "auto"  # `embed`: packed batches (model.packing, see retrieval.packing): auto | True | False
        self.pack_buckets = False  # packed token counts rounded up to a few shapes (`compile_layers(buckets=True)`)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # unused; would leave parameters without gradients under DDP
        holder, self._attr = _layer_holder(backbone)
        accepted = inspect.signature(backbone.forward).parameters  # DistilBERT, MPNet, ModernBERT: no token types
        self._inputs = tuple(k for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted)
        object.__setattr__(self, "_holder", holder)  # a reference, not a submodule: no duplicate state-dict keys

    # ------------------------------------------------------------ shape

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self._holder, self._attr)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def packing(self):
        return self._packing

    @packing.setter
    def packing(self, value) -> None:
        self._packing = check_packing(value)

    @property
    def config(self):
        return self.backbone.config

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm the backbone applies after its last layer (ModernBERT's `final_norm`), or None."""
        return _final_norm(self.backbone)

    def check(self, size: Size) -> Size:
        check_size(size, self.num_layers, self.hidden_size, self.name)
        return size

    @property
    def name(self) -> str:
        return str(getattr(self.backbone.config, "_name_or_path", "") or type(self.backbone).__name__)

    def truncate_(self, num_layers: int) -> "StarbucksEncoder":
        """Keep only the first `num_layers` layers, for good (the `separate` baseline, an export). The
        config follows: `num_hidden_layers` and every per-layer list (ModernBERT's `layer_types`: any
        list as long as the layer list, token ids aside), so that the cut model saves and reloads. The
        final norm stays: the cut model's output is each size's vector (`hidden_states`)."""
        if not 1 <= num_layers <= self.num_layers:
            raise StarbucksError(f"cannot truncate {self.name} ({self.num_layers} layers) to {num_layers} layers")
        config, depth = self.backbone.config, self.num_layers
        for key, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == depth and _per_layer(key):
                setattr(config, key, type(value)(value[:num_layers]))
        setattr(self._holder, self._attr, nn.ModuleList(list(self.layers)[:num_layers]))
        config.num_hidden_layers = num_layers
        return self

    # ------------------------------------------------------------ forward

    @contextlib.contextmanager
    def _exit_after(self, depth: int) -> Iterator[None]:
        """Run only the first `depth` layers inside the block."""
        full = self.layers
        if depth < len(full):
            setattr(self._holder, self._attr, nn.ModuleList(list(full)[:depth]))
        try:
            yield
        finally:
            setattr(self._holder, self._attr, full)

    def hidden_states(self, batch: Mapping[str, torch.Tensor], layers: Iterable[int]) -> dict[int, torch.Tensor]:
        """Token states `(B, T, H)` of each requested layer `n` (1-based), running no deeper than needed.

        A layer's states are what the model cut to `n` layers outputs (its `last_hidden_state`): layer
        `n`'s output, passed through the backbone's final norm when it has one (`final_norm`: ModernBERT's).
        The full model and a model cut to fewer layers (`truncate_`, an export) give the same vectors."""
        wanted = sorted(set(int(n) for n in layers))
        if not wanted:
            return {}
        if wanted[0] < 1 or wanted[-1] > self.num_layers:
            raise StarbucksError(
                f"layer {wanted[-1] if wanted[-1] > self.num_layers else wanted[0]} requested but {self.name} "
                f"has layers 1..{self.num_layers}"
            )
        # The deepest requested layer's states are the output of the backbone run that deep (early exit):
        # after the final norm, if any. A hook gives the shallower ones, which the final norm then follows.
        deepest, norm = wanted[-1], self.final_norm
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            self.layers[n - 1].register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, _first(out)))
            for n in wanted
            if n < deepest
        ]
        inputs = {k: v for k, v in batch.items() if k in self._inputs}
        try:
            with self._exit_after(deepest):
                output = self.backbone(**inputs, return_dict=True)
        finally:
            for h in hooks:
                h.remove()
        if norm is not None:
            captured = {n: norm(h) for n, h in captured.items()}
        captured[deepest] = output.last_hidden_state
        return captured

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor, dim: int) -> torch.Tensor:
        """Pool token states to one vector, keep the first `dim` dims, normalise if configured."""
        states = states[..., :dim]
        if self.pooling == "cls":
            vec = states[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            vec = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self._normalized(vec)

    def _normalized(self, vec: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(vec.float(), dim=-1).to(vec.dtype) if self.normalize else vec

    def embed(self, batch: Mapping[str, torch.Tensor], sizes: Sequence[Size]) -> dict[Size, torch.Tensor]:
        """One `(B, dim)` embedding per size, in the order given; one pass to the deepest layer.

        With `length_buckets = n > 1` the batch's rows are sorted by length and run as `n` sub-batches,
        each padded only to its own longest row: the same embeddings (padding is masked out) for
        fewer padded tokens and less activation memory, which pays when lengths vary (training
        batches of passages) and the batch is large (each sub-batch costs its own kernel launches).
        `length_buckets = 0`: one sub-batch per `BUCKET_TOKENS` padded tokens of the batch.

        Packed (`packing`, see `retrieval.packing`): the batch's real tokens run as one sequence, no
        padding anywhere but inside the attention of the CPU path; the same embeddings."""
        sizes = [self.check(s) for s in sizes]
        if use_packing(self.packing, self.backbone, batch["input_ids"].device):
            packed, states = packed_hidden_states(
                self.backbone, self.layers, batch, sorted({s.layers for s in sizes}), self.pack_buckets
            )
            norm = self.final_norm  # raw layer outputs: each size's states as in `hidden_states`
            if norm is not None:
                states = {n: norm(h) for n, h in states.items()}
            return {s: self._normalized(packed.pool(states[s.layers][:, : s.dim], self.pooling)) for s in sizes}
        mask = batch["attention_mask"]
        buckets = self.length_buckets or -(-mask.numel() // BUCKET_TOKENS)  # 0: by the padded token count
        buckets = min(buckets, len(mask) // 8)  # sub-batches of at least 8 rows
        if buckets <= 1:
            states = self.hidden_states(batch, {s.layers for s in sizes})
            return {s: self.pool(states[s.layers], mask, s.dim) for s in sizes}
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        chunks = torch.tensor_split(order, buckets)
        # each chunk's longest row is its last (ascending order): one device sync for all widths
        widths = lengths[torch.stack([rows[-1] for rows in chunks])].tolist()
        parts: dict[Size, list[torch.Tensor]] = {s: [] for s in sizes}
        for rows, width in zip(chunks, widths):
            sub = {k: v[rows] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
            width = min(-(-int(width) // 16) * 16, mask.shape[1])  # a multiple of 16: few distinct shapes
            sub = {k: v[:, :width] for k, v in sub.items()}
            states = self.hidden_states(sub, {s.layers for s in sizes})
            for s in sizes:
                parts[s].append(self.pool(states[s.layers], sub["attention_mask"], s.dim))
        inverse = torch.argsort(order)
        return {s: torch.cat(parts[s])[inverse] for s in sizes}

    forward = embed

    def compile_layers(self, buckets: bool = False) -> "StarbucksEncoder":
        """`torch.compile` each layer's forward (dynamic shapes: batches differ in length); the
        early-exit hooks and the layer list stay eager. `buckets`: static shapes instead, packed
        batches rounded up to a few token counts (`retrieval.packing.bucket`), one graph each."""
        self.pack_buckets = buckets
        for layer in self.layers:
            layer.forward = torch.compile(layer.forward, dynamic=not buckets)
        return self


def tokenize(tokenizer, texts: Sequence[str], max_length: int, prefix: str = "", pad_to_multiple_of: int | None = 8):
    """Tokenise a batch with dynamic padding (to the longest text, rounded up to a multiple of
    `pad_to_multiple_of` when `max_length` allows): `input_ids` and `attention_mask` tensors.

    The same ids and mask as `tokenizer(texts, padding=True, ...)`, built through numpy rather
    than the tokenizer's nested-list tensor conversion (2-3x faster; tokenising is what keeps a GPU
    waiting when encoding). No `token_type_ids`: one segment, which BERT-style models default to.
    Always padded on the right, even for a tokenizer set to pad on the left: the encoder reads CLS at
    position 0, counts positions from the first token and cuts length buckets on the right."""
    import numpy as np
    from transformers import BatchEncoding

    if prefix:
        texts = [prefix + t for t in texts]
    ids = tokenizer(
        list(texts), max_length=max_length, truncation=True, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max()) if len(ids) else 0
    if pad_to_multiple_of and max_length % pad_to_multiple_of == 0:
        width = min(-(-width // pad_to_multiple_of) * pad_to_multiple_of, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    positions = np.arange(width)
    for row, seq in zip(input_ids, ids):  # on the right, whatever tokenizer.padding_side says
        row[: len(seq)] = seq
    mask = positions[None, :] < lengths[:, None]
    return BatchEncoding(
        {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
    )
