"""Starbucks training in a plain sentence-transformers script: `StarbucksSTLoss` wraps any ST loss.

    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from retrieval.st_loss import StarbucksSTLoss, save_for_starbucks

    model = SentenceTransformer("bert-base-uncased")
    loss = StarbucksSTLoss(model, MultipleNegativesRankingLoss(model),
                           sizes=[(2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768)])
    SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss).train()
    save_for_starbucks(model, "my-model", loss.sizes)  # loads in this toolkit at every size

One forward pass of the model's transformer per input column, with the hidden states of every
layer; a size `(n, d)` is the model's own pooling (and normalisation) of layer `n`'s token states,
cut to the first `d` dims. The base loss runs on every size's embeddings (`srl`: every size of
the list, the mean of the terms; `2dmse`: per step `n ~ U(1, N-1)` and `d` drawn from the list's
dims below `D`, the terms of `(n, d), (n, D), (N, d), (N, D)` summed; the sampler is the
trainer's, `retrieval.samplers.TwoDMSESizes` with `dims="list"`), and each size adds
`kl_weight * KL(P_teacher || P_size)`: the row softmax at `kl_temperature` of the anchors' scores
against all candidate columns (`model.similarity` times the base loss's `scale`), the teacher
being the largest size, detached.

How it differs from the toolkit's `retrieval.losses.StarbucksLoss` (the `python -m train` loss):
that one scores the toolkit's (query, passage group) batches with `InfoNCE`; this one wraps any ST
loss over ST's input columns. With MultipleNegativesRankingLoss and the same KL temperature the two
compute the same value (`tests/test_st_loss.py`). The defaults differ as the authors' two code paths
do: `kl_temperature=0.3` here, as their sentence-transformers loss (sts/starbucks_loss.py:27), and
1.0 there, where the KL is on the retrieval scores already divided by `train.temperature`, as their
retrieval trainer (retrieval/modeling.py:143).

Base losses: any ST loss with `compute_loss_from_embeddings` (MultipleNegativesRankingLoss,
CoSENTLoss, AnglELoss, TripletLoss, ...), and the gradient-caching ones
(CachedMultipleNegativesRankingLoss, ...), whose mini-batches then embed every size at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json
from retrieval.losses import kl_divergence
from retrieval.checkpoint import META_FILE, META_VERSION
from retrieval.encoder import POOLINGS
from retrieval.samplers import FixedSizes, TwoDMSESizes
from retrieval.sizes import Size, SizeList, check_size, parse_size

METHODS = ("srl", "2dmse")


def as_sizes(specs: Iterable) -> SizeList:
    """`(layers, dim)` pairs, `Size`s or `LxD` strings -> a SizeList."""
    out = []
    for spec in specs:
        if isinstance(spec, (tuple, list)) and len(spec) == 2:
            out.append(Size("", int(spec[0]), int(spec[1])))
        else:
            out.append(parse_size(spec))
    hybrid = next((s for s in out if s.parts), None)
    if hybrid is not None:
        raise StarbucksError(f"{hybrid.key} is a hybrid size: a model is trained at plain sizes (LxD); give its parts")
    return SizeList(out)


def unwrap(model) -> nn.Module:
    """The SentenceTransformer inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    from sentence_transformers import SentenceTransformer

    inner = model
    while not isinstance(inner, SentenceTransformer):
        inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if inner is None:
            raise StarbucksError(f"StarbucksLoss needs a SentenceTransformer model, got {type(model).__name__}")
    return inner


def _check_modules(model) -> bool:
    """Transformer, Pooling (one per-dim mode) and optionally Normalize; returns whether it normalises."""
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    modules = list(model)
    if not modules or not isinstance(modules[0], Transformer):
        raise StarbucksError("StarbucksLoss needs a SentenceTransformer whose first module is a Transformer")
    rest = modules[1:]
    if not rest or not isinstance(rest[0], Pooling) or not all(isinstance(m, Normalize) for m in rest[1:]):
        names = ", ".join(type(m).__name__ for m in modules)
        raise StarbucksError(
            f"StarbucksLoss needs Transformer + Pooling (+ Normalize), got {names}: a size is the first d dims "
            f"of the pooled layer-n states, which a module after the pooling (Dense, ...) would mix"
        )
    if not isinstance(rest[0].pooling_mode, str):
        raise StarbucksError(
            f"StarbucksLoss needs one pooling mode, got {rest[0].pooling_mode}: the first d dims "
            f"of concatenated poolings are not a sub-embedding"
        )
    return len(rest) > 1


class SizesForward:
    """Replaces a SentenceTransformer's `forward`: `sentence_embedding` holds every size's embedding,
    concatenated in the order of `sizes` (split them with `split`); one transformer pass."""

    def __init__(self, model, sizes: Sequence[Size]):
        self.model = model
        self.sizes = list(sizes)
        self.normalize = _check_modules(model)

    def __call__(self, features: dict, **kwargs) -> dict:
        transformer, *after = list(self.model)
        config = transformer.auto_model.config
        keep = config.output_hidden_states
        config.output_hidden_states = True
        try:
            out = transformer(features, **kwargs)
        finally:
            config.output_hidden_states = keep
        layers = out.pop("all_layer_embeddings")  # embeddings output, then layer 1..L
        parts = []
        for size in self.sizes:
            sub = {**out, "token_embeddings": layers[size.layers]}
            for module in after:
                sub = module(sub)
            vec = sub["sentence_embedding"][:, : size.dim]
            parts.append(F.normalize(vec, dim=-1) if self.normalize else vec)
        return {**out, "sentence_embedding": torch.cat(parts, dim=-1)}

    def split(self, embedding: Tensor) -> dict[Size, Tensor]:
        return dict(zip(self.sizes, embedding.split([s.dim for s in self.sizes], dim=-1)))


@contextlib.contextmanager
def sizes_forward(model, sizes: Sequence[Size]) -> Iterator[SizesForward]:
    """Inside the block `model(features)` (also through DDP) gives every size's embedding at once."""
    inner = unwrap(model)
    previous = inner.__dict__.get("forward")  # another wrapper's patch, restored afterwards
    forward = SizesForward(inner, sizes)
    inner.forward = forward
    try:
        yield forward
    finally:
        if previous is None:
            del inner.forward  # back to the class's forward
        else:
            inner.forward = previous


def embed_sizes(model, features: dict, sizes: Sequence[Size]) -> dict[Size, Tensor]:
    """Every size's `(B, d)` embedding of one tokenised batch, from one transformer pass."""
    with sizes_forward(model, sizes) as forward:
        return forward.split(model(features)["sentence_embedding"])


class StarbucksSTLoss(nn.Module):
    """A sentence-transformers loss modifier: `loss` at every Starbucks size plus KL alignment to the largest.

    `sizes`: `(layers, dim)` pairs (or `LxD` strings), small to large; `method`: `srl` (every size,
    mean of the terms) or `2dmse` (four sizes per step, summed). `kl_weight=0` leaves out the KL.
    """

    def __init__(
        self,
        model,
        loss: nn.Module | None = None,
        sizes: Iterable | None = None,
        kl_weight: float = 1.0,
        kl_temperature: float = 0.3,
        method: str = "srl",
        seed: int = 0,
    ):
        super().__init__()
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        self.model = model
        self.loss = loss if loss is not None else MultipleNegativesRankingLoss(model)
        if sizes is None:
            raise StarbucksError("StarbucksSTLoss needs sizes, e.g. sizes=[(2, 32), (4, 64), (6, 128)] (layers, dims)")
        self.sizes = as_sizes(sizes)
        if method not in METHODS:
            raise StarbucksError(f"method = {method!r} is not one of {', '.join(METHODS)}")
        if not kl_temperature > 0:
            raise StarbucksError(f"kl_temperature = {kl_temperature} must be > 0")
        inner = unwrap(model)
        _check_modules(inner)
        config = inner[0].auto_model.config
        self.num_layers, self.hidden = int(config.num_hidden_layers), int(config.hidden_size)
        self.sizes.validate(self.num_layers, self.hidden, str(getattr(config, "_name_or_path", "") or "the model"))
        self.method = method
        self.kl_weight = float(kl_weight)
        self.kl_temperature = float(kl_temperature)
        self.scale = float(getattr(self.loss, "scale", 1.0))
        self.sampler = TwoDMSESizes(self.sizes, seed, "list") if method == "2dmse" else FixedSizes(self.sizes)
        self.steps = 0  # forward calls so far: 2DMSE's draw of the next one
        self.step_sizes: list[Size] = list(self.sizes)
        self.cached = bool(getattr(self.loss, "uses_gradient_cache", False))
        if self.cached:  # the cached loss embeds its mini-batches (again in backward) with all sizes at once
            self._base_calculate = self.loss.calculate_loss
            embed_minibatch = self.loss.embed_minibatch

            def embed_all_sizes(*args, **kwargs):
                with sizes_forward(self.loss.model, self.step_sizes):
                    return embed_minibatch(*args, **kwargs)

            self.loss.embed_minibatch = embed_all_sizes
            self.loss.calculate_loss = self._calculate_cached
        elif not hasattr(self.loss, "compute_loss_from_embeddings"):
            raise StarbucksError(
                f"{type(self.loss).__name__} has no compute_loss_from_embeddings, so it cannot score given "
                f"embeddings; use a loss that has it (MultipleNegativesRankingLoss, CoSENTLoss, ...) or a Cached... loss"
            )

    # ------------------------------------------------------------ which sizes

    def sample_sizes(self) -> list[Size]:
        """The sizes of the next step: all (srl), or 2DMSE's `(n, d), (n, D), (N, d), (N, D)`."""
        self.steps += 1
        return list(self.sampler.at(self.steps - 1))

    # ------------------------------------------------------------ terms from embeddings

    def _labels_for(self, labels, size: Size):
        """Per-column target embeddings (distillation losses) are cut to the size's dims."""
        if isinstance(labels, Tensor) and labels.ndim in (2, 3) and labels.size(-1) == self.hidden:
            return labels[..., : size.dim]
        return labels

    def kl_term(self, columns: dict[Size, list[Tensor]], size: Size, teacher: Size) -> Tensor:
        """`KL(P_teacher || P_size)` of the anchors' scores against the candidate columns (the anchors
        themselves when there is only one column)."""
        similarity = getattr(self.loss, "similarity_fct", None) or unwrap(self.model).similarity  # the base loss's

        def logits(s: Size) -> Tensor:
            anchors, *candidates = columns[s]
            return similarity(anchors, torch.cat(candidates or [anchors])) * self.scale

        return kl_divergence(logits(teacher), logits(size), self.kl_temperature)

    def size_terms(self, columns: dict[Size, list[Tensor]], labels, sizes: Sequence[Size]) -> dict[Size, Tensor]:
        """Per size: base loss + `kl_weight` * KL to the largest of `sizes` (the teacher, detached)."""
        teacher = max(sizes, key=lambda s: (s.layers, s.dim))
        terms = {}
        for s in sizes:
            term = self.loss.compute_loss_from_embeddings(columns[s], self._labels_for(labels, s))
            if self.kl_weight and s != teacher:
                term = term + self.kl_weight * self.kl_term(columns, s, teacher)
            terms[s] = term
        return terms

    def reduce(self, terms: Sequence[Tensor]) -> Tensor:
        total = sum(terms)
        return total / len(terms) if self.method == "srl" else total

    # ------------------------------------------------------------ forward

    def embed_columns(self, sentence_features: Iterable[dict], sizes: Sequence[Size]) -> dict[Size, list[Tensor]]:
        """Every size's embeddings of every input column (one transformer pass per column)."""
        columns: dict[Size, list[Tensor]] = {s: [] for s in sizes}
        with sizes_forward(self.model, sizes) as forward:
            for features in sentence_features:
                for s, emb in forward.split(self.model(features)["sentence_embedding"]).items():
                    columns[s].append(emb)
        return columns

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        self.step_sizes = self.sample_sizes()
        if self.cached:
            return self.loss(sentence_features, labels)
        columns = self.embed_columns(sentence_features, self.step_sizes)
        return self.reduce(list(self.size_terms(columns, labels, self.step_sizes).values()))

    def _calculate_cached(self, reps: list[list[Tensor]], labels=None, *, with_backward: bool = False) -> Tensor:
        """The cached loss's `calculate_loss` over every size: `reps` hold all sizes side by side."""
        sizes = self.step_sizes
        teacher = max(sizes, key=lambda s: (s.layers, s.dim))
        bounds, start = {}, 0
        for s in sizes:
            bounds[s] = (start, start + s.dim)
            start += s.dim
        # each size's slice of the cached embeddings, as leaves: the base loss back-propagates into
        # them chunk by chunk; their gradients then flow into `reps` with the size's weight
        pieces = {s: [[r[:, a:b] for r in column] for column in reps] for s, (a, b) in bounds.items()}
        leaves = {
            s: [[p.detach().requires_grad_(with_backward) for p in column] for column in cols]
            for s, cols in pieces.items()
        }
        weight = 1.0 / len(sizes) if self.method == "srl" else 1.0
        columns = {s: [torch.cat(column) for column in cols] for s, cols in leaves.items()}
        total = 0.0
        for s in sizes:
            term = self._base_calculate(leaves[s], self._labels_for(labels, s), with_backward=with_backward)
            if self.kl_weight and s != teacher:
                kl = self.kl_weight * self.kl_term(columns, s, teacher)
                if with_backward:
                    kl.backward()
                    kl = kl.detach()
                term = term + kl
            total = total + weight * term
        if with_backward:
            for s in sizes:
                for column, leaf_column in zip(pieces[s], leaves[s]):
                    for piece, leaf in zip(column, leaf_column):
                        if leaf.grad is not None:
                            piece.backward(weight * leaf.grad)
        return total

    def get_config_dict(self) -> dict:
        return {
            "loss": type(self.loss).__name__,
            "sizes": [s.key for s in self.sizes],
            "method": self.method,
            "kl_weight": self.kl_weight,
            "kl_temperature": self.kl_temperature,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{zhuang2025starbucks,
    title={Starbucks: Improved Training for 2D Matryoshka Embeddings},
    author={Zhuang, Shengyao and Wang, Shuai and Zheng, Fabio and Koopman, Bevan and Zuccon, Guido},
    booktitle={SIGIR},
    year={2025}
}
"""


@contextlib.contextmanager
def at_size(model, size) -> Iterator[None]:
    """Inside the block the model encodes at one size (for evaluators: `with at_size(model, (2, 32)): ev(model)`)."""
    (size,) = as_sizes([size])
    inner = unwrap(model)
    config = inner[0].auto_model.config
    check_size(size, int(config.num_hidden_layers), int(config.hidden_size))
    with sizes_forward(inner, [size]):
        yield


def save_for_starbucks(model, directory: str | Path, sizes: Iterable, method: str = "srl") -> Path:
    """`model.save(directory)` plus the `starbucks.json` that makes it a checkpoint of this toolkit
    (pooling, normalisation, sizes, max lengths): `StarbucksModel.from_pretrained(directory)` then
    encodes at every size exactly as the loss trained it."""
    inner = unwrap(model)
    normalize = _check_modules(inner)
    pooling = inner[1].pooling_mode
    if pooling not in POOLINGS:
        raise StarbucksError(f"this toolkit pools with {' or '.join(POOLINGS)}; the model pools with {pooling!r}")
    sizes = as_sizes(sizes)
    config = inner[0].auto_model.config
    sizes.validate(int(config.num_hidden_layers), int(config.hidden_size))
    directory = Path(directory)
    inner.save(str(directory))
    # each side as ST encodes it (encode_query / encode_document): its own max length where the
    # Transformer has one (query_length / document_length), else max_seq_length; its prompt
    length = int(inner.max_seq_length)
    prompts = getattr(inner, "prompts", None) or {}
    atomic_write_json(
        directory / META_FILE,
        {
            "format_version": META_VERSION,
            "pooling": pooling,
            "normalize": normalize,
            "sizes": sizes.to_config(),
            "method": method,
            "base_model": str(getattr(config, "_name_or_path", "")),
            "query_max_length": int(getattr(inner[0], "query_length", None) or length),
            "passage_max_length": int(getattr(inner[0], "document_length", None) or length),
            "query_prefix": str(prompts.get("query") or ""),
            "passage_prefix": str(prompts.get("document") or ""),
        },
    )
    return directory


def __getattr__(name: str):
    """`StarbucksLoss`, this class's name before 0.2: still importable, with a warning."""
    if name == "StarbucksLoss":
        import warnings

        warnings.warn(
            "retrieval.st_loss.StarbucksLoss is now StarbucksSTLoss (retrieval.losses.StarbucksLoss is the "
            "toolkit trainer's loss); import StarbucksSTLoss",
            FutureWarning,
            stacklevel=2,
        )
        return StarbucksSTLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
