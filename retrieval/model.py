"""`StarbucksModel`: texts -> embeddings at any Starbucks size; the toolkit's one encoding path.

    from retrieval import StarbucksModel
    model = StarbucksModel.from_pretrained("runs/demo/model")
    q = model.encode_queries(["edit a pdf file"], size="grande")
    p = model.encode_passages(["A PDF editor.", "An IRC client."], size="grande")
    print(model.similarity(q, p))

A checkpoint of this toolkit brings its pooling, normalisation, sizes, query/passage prefixes and
max lengths (`starbucks.json`); a plain HF encoder needs `pooling=` (and `normalize=`) given. Only
the layers the requested sizes need are run (early exit); several sizes come from one pass.

A hybrid size (`3x384+6x64`, `retrieval.sizes`) is its parts' vectors end to end, each scaled by
`sqrt(weight)`, so that `similarity` gives the weighted sum of the parts' scores; the parts of this
model come from the same one pass, those of other models (`6x64@width`, `part_models=`) from their
own pass, in a thread of their own, at the same time (`parallel_parts`: `auto` does so on a GPU, where each
model gets a CUDA stream; on the CPU the parts run one after the other, which bench/hybrid_latency.py
measured no slower on a busy 2-core machine):

    model = StarbucksModel.from_pretrained("runs/depth/model", part_models={"width": "runs/width/model"})
    q = model.encode_queries(["edit a pdf file"], size="3x384+6x64@width")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from retrieval.config import DEFAULTS
from retrieval.errors import StarbucksError
from retrieval.checkpoint import META_FILE, load_encoder, read_meta, resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.sizes import meta_sizes
from retrieval.settings import autocast_context, resolve_device, resolve_precision
from retrieval.sizes import Size, SizeList, check_size
from retrieval.store import embedding_identity, model_fingerprint

KINDS = ("query", "passage")
# what a checkpoint's starbucks.json settles; a plain model takes them from the caller's `defaults`
SETTINGS = ("pooling", "normalize", "query_max_length", "passage_max_length", "query_prefix", "passage_prefix")


class _TokenizedBatches(torch.utils.data.Dataset):
    """Item `n`: the rows and tokenised texts of the `n`-th batch of `order` (for a DataLoader, whose
    worker processes then tokenise while the GPU encodes; it holds the tokenizer, not the model)."""

    def __init__(
        self, tokenizer, texts: Sequence[str], order: list[int], batch_size: int, max_length: int, prefix: str
    ):
        self.tokenizer, self.texts, self.order, self.batch_size = tokenizer, texts, order, batch_size
        self.max_length, self.prefix = max_length, prefix

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, n: int):
        rows = self.order[n * self.batch_size : (n + 1) * self.batch_size]
        batch = tokenize(self.tokenizer, [self.texts[i] for i in rows], self.max_length, self.prefix)
        return rows, dict(batch)


def _quiet_tokenizers(_worker: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked worker tokenises on its own core


def _hub_meta(repo_id: str) -> dict | None:
    """`starbucks.json` of a hub model (None when it has none or the hub cannot be reached)."""
    import json

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo_id, META_FILE)).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def checkpoint_meta(name_or_path: str) -> dict:
    """The `starbucks.json` of a local checkpoint or hub model (`{}` for a plain HF model); a local
    path that is not a model directory is one clear line."""
    path = resolve_model_path(str(name_or_path))
    if os.path.isdir(path):
        if not (Path(path) / "config.json").is_file():
            raise StarbucksError(
                f"{name_or_path} is not a model directory (no config.json); give a model saved by this toolkit "
                f"(runs/<name>/model), an HF model directory or a hub id"
            )
        return read_meta(path) or {}
    if os.path.exists(path):
        raise StarbucksError(
            f"{name_or_path} is a file, not a model directory; give the directory that holds "
            f"config.json and starbucks.json"
        )
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise StarbucksError(
            f"{name_or_path} does not exist; give a model directory (runs/<name>/model) or a hub id such as user/name"
        )
    return _hub_meta(path) or {}


class StarbucksModel:
    """An encoder, its tokenizer and how it was trained: embeddings of any size, one pass for many."""

    def __init__(
        self,
        encoder: StarbucksEncoder,
        tokenizer,
        sizes: SizeList | None = None,
        *,
        query_max_length: int,
        passage_max_length: int,
        query_prefix: str = "",
        passage_prefix: str = "",
        source: str = "",
        meta: Mapping | None = None,
        precision: str = "auto",
        part_models: Mapping[str, "StarbucksModel"] | None = None,
        parallel_parts: bool | str = "auto",
    ):
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.sizes = sizes or SizeList([Size("", encoder.num_layers, encoder.hidden_size)])
        self.query_max_length, self.passage_max_length = int(query_max_length), int(passage_max_length)
        self.query_prefix, self.passage_prefix = str(query_prefix or ""), str(passage_prefix or "")
        self.source = source or encoder.name
        self.meta = dict(meta or {})
        self.precision = precision  # resolved per call, on the device the model is on then
        resolve_precision(precision, self.device, "precision")  # a bad value fails here, in one line
        self.part_models = dict(part_models or {})  # label -> the model of a hybrid's `@label` parts
        self.parallel_parts = parallel_parts  # other models' parts at the same time: True | False | auto (on a GPU)

    def _check_positions(self, width: int, kind: str | None) -> None:
        """One line (not an index error inside the model) when a batch is longer than the model's positions
        (RoBERTa-style models start counting after their padding index)."""
        config = self.encoder.config
        limit = getattr(config, "max_position_embeddings", None)
        if not limit:
            return
        if (
            getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert")
            and config.pad_token_id is not None
        ):
            limit -= config.pad_token_id + 1
        if width > limit:
            side = "query" if kind == "query" else "passage"
            raise StarbucksError(
                f"texts of {width} tokens but {self.source} has {limit} positions; set model.{side}_max_length "
                f"(or {side}_max_length=) to at most {limit}"
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        sizes=None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        query_prefix: str | None = None,
        passage_prefix: str | None = None,
        precision: str = "auto",
        attn_implementation: str | None = "sdpa",
        defaults: Mapping | None = None,
        part_models: Mapping[str, "str | os.PathLike | StarbucksModel"] | None = None,
        parallel_parts: bool | str = "auto",
    ) -> "StarbucksModel":
        """Load a checkpoint of this toolkit, a hub id, or a plain HF encoder.

        Keyword settings given here win; then the checkpoint's `starbucks.json`; then `defaults`
        (a mapping with the same keys and `sizes`, e.g. a config's `model` section); a plain model
        must be told its `pooling` (`"cls"` or `"mean"`). `sizes`: a SizeList or config entries
        (`[{name, layers, dim}, "8x256"]`); without any, the full size only. `device`: `auto` (None)
        picks a GPU when there is one; `precision`: `auto` (fp16 autocast on a GPU, bf16 on a CPU with
        native bf16, else fp32: `retrieval.settings.resolve_precision`), `fp32`, `fp16` or `bf16`. `part_models`: label -> model (a path, hub id or `StarbucksModel`; a
        path is loaded with its own `starbucks.json`, on the same device) for hybrid sizes' `@label` parts,
        encoded at the same time as this model's when `parallel_parts` (`auto`: on a GPU).
        """
        source = str(name_or_path)
        meta = checkpoint_meta(source)
        given = {
            "pooling": pooling,
            "normalize": normalize,
            "query_max_length": query_max_length,
            "passage_max_length": passage_max_length,
            "query_prefix": query_prefix,
            "passage_prefix": passage_prefix,
        }
        fallback = {**DEFAULTS["model"], "normalize": False, "pooling": None, **(defaults or {})}
        settings = {k: given[k] if given[k] is not None else meta.get(k, fallback.get(k)) for k in SETTINGS}
        if settings["pooling"] is None:
            raise StarbucksError(
                f"{source} has no starbucks.json, so its pooling is unknown: give pooling='cls' or 'mean' (and "
                f"normalize=True for cosine similarity), e.g. StarbucksModel.from_pretrained({source!r}, "
                f"pooling='cls', normalize=False)"
            )
        sizes = sizes if sizes is not None else meta_sizes(meta) or (defaults or {}).get("sizes")
        if sizes is not None and not isinstance(sizes, SizeList):
            sizes = SizeList.from_config(sizes)
        encoder, tokenizer, _ = load_encoder(
            source, settings["pooling"], bool(settings["normalize"]), attn_implementation
        )
        encoder.eval().to(resolve_device(device, "device"))
        others = {
            str(label): m
            if isinstance(m, StarbucksModel)
            else cls.from_pretrained(
                m, encoder.backbone.device, precision=precision, attn_implementation=attn_implementation
            )
            for label, m in (part_models or {}).items()
        }
        return cls(
            encoder,
            tokenizer,
            sizes,
            query_max_length=settings["query_max_length"],
            passage_max_length=settings["passage_max_length"],
            query_prefix=settings["query_prefix"],
            passage_prefix=settings["passage_prefix"],
            source=source,
            meta=meta,
            precision=precision,
            part_models=others,
            parallel_parts=parallel_parts,
        )

    # ------------------------------------------------------------ what it is

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def pooling(self) -> str:
        return self.encoder.pooling

    @property
    def normalize(self) -> bool:
        return self.encoder.normalize

    @property
    def similarity_fn_name(self) -> str:
        """`cosine` for a normalised model, else `dot` (sentence-transformers' names)."""
        return "cosine" if self.normalize else "dot"

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (what an embedding store records as `model_sha256`)."""
        return model_fingerprint(self.encoder)

    def size(self, spec: str | Size) -> Size:
        """A size by name (`grande`), `LxD` (`8x256`), hybrid spec (`3x384+6x64@width`) or `Size`,
        checked against the model's shape (a hybrid's `@label` parts against that model's)."""
        size = self.sizes.get(spec)
        if not size.parts:
            return self.encoder.check(size)
        check_size(size, self.encoder.num_layers, self.encoder.hidden_size, self.encoder.name)
        for p in size.parts:
            if p.model:
                self.part_model(p.model, size).size(p.size)
        return size

    def part_model(self, label: str, size: Size | None = None) -> "StarbucksModel":
        """The model of a hybrid's `@label` parts; one line when none has that label."""
        if label not in self.part_models:
            have = ", ".join(sorted(self.part_models)) or "none"
            raise StarbucksError(
                f"{'size ' + size.key if size else 'a hybrid'} takes a part from model {label!r}, but no model has "
                f"that label (labelled: {have}); name it: encode.part_models.{label}=PATH (part_models={{'{label}': "
                f"PATH}} in Python)"
            )
        return self.part_models[label]

    def side(self, kind: str | None) -> tuple[int, str]:
        """`(max_length, prefix)` of queries, passages, or (None) plain texts: the passage length, no prefix."""
        if kind is None:
            return self.passage_max_length, ""
        if kind not in KINDS:
            raise StarbucksError(f"kind = {kind!r} is not one of {', '.join(KINDS)}")
        if kind == "query":
            return self.query_max_length, self.query_prefix
        return self.passage_max_length, self.passage_prefix

    def identity(self, size: Size, kind: str) -> dict:
        """The identity record of `size`'s embeddings of `kind` (`query` or `passage`) in a store. A hybrid
        with parts from other models records one `model_sha256` over this model's weights and each other
        model's weights and settings (pooling, normalisation, max lengths and prefixes of both sides: the
        queries and passages of a hybrid share it, as those of one model share its weights' hash)."""
        max_length, prefix = self.side(kind)
        fingerprint = self.fingerprint
        if size.models:
            others = [
                [label, m.fingerprint, m.pooling, m.normalize, *m.side("query"), *m.side("passage")]
                for label, m in ((label, self.part_model(label, size)) for label in size.models)
            ]
            fingerprint = hashlib.sha256(json.dumps([fingerprint, others]).encode()).hexdigest()
        precision = resolve_precision(self.precision, self.device, "precision")
        return embedding_identity(fingerprint, size, self.pooling, self.normalize, max_length, prefix, precision)

    def part_sources(self, size: Size) -> dict:
        """Where a hybrid's parts from other models come from (`{label: source}`; empty for other sizes)."""
        return {label: self.part_model(label, size).source for label in size.models}

    def to(self, device: str | torch.device) -> "StarbucksModel":
        self.encoder.to(resolve_device(device, "device"))
        for other in self.part_models.values():
            other.to(device)
        return self

    # ------------------------------------------------------------ encoding

    def encode(
        self,
        texts: str | Sequence[str],
        size: str | Size | None = None,
        *,
        sizes: Sequence[str | Size] | None = None,
        batch_size: int = 32,
        progress: bool = False,
        kind: str | None = None,
    ):
        """Embeddings of `texts` (float32, `(len(texts), dim)`; one text: `(dim,)`) at `size` (default:
        the largest), or with `sizes=[...]` a dict size name -> array, all from one pass. `kind`:
        `query` / `passage` adds that side's prefix and max length (see `encode_queries`)."""
        if size is not None and sizes is not None:
            raise StarbucksError("give size= or sizes=, not both")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        wanted = [self.size(s) for s in (sizes if sizes is not None else [size or self.sizes.largest])]
        bar = tqdm(total=len(texts), unit="text", desc="encode", disable=not progress, dynamic_ncols=True)
        with bar:
            out = self.embed_texts(texts, wanted, kind, batch_size, progress=bar)
        if single:
            out = {s: v[0] for s, v in out.items()}
        if sizes is None:
            return out[wanted[0]]
        return {s.name: out[s] for s in wanted}

    def encode_queries(self, texts, size=None, **options):
        """`encode` with the query prefix and max length."""
        return self.encode(texts, size, kind="query", **options)

    def encode_passages(self, texts, size=None, **options):
        """`encode` with the passage prefix and max length."""
        return self.encode(texts, size, kind="passage", **options)

    def similarity(self, queries: np.ndarray, passages: np.ndarray) -> np.ndarray:
        """Scores `(len(queries), len(passages))`: the dot product the model was trained with (its
        embeddings are already L2-normalised where it uses cosine similarity)."""
        q, p = np.asarray(queries, dtype=np.float32), np.asarray(passages, dtype=np.float32)
        if q.shape[-1] != p.shape[-1]:
            raise StarbucksError(f"queries have {q.shape[-1]} dims and passages {p.shape[-1]}: encode both at one size")
        return np.atleast_2d(q) @ np.atleast_2d(p).T

    def embed_texts(
        self,
        texts: Sequence[str],
        sizes: Sequence[Size],
        kind: str | None,
        batch_size: int = 32,
        progress: tqdm | None = None,
        workers: int = 0,
        dtype=np.float32,
    ) -> dict[Size, np.ndarray]:
        """`(len(texts), dim)` arrays of `dtype` per size, in the order of `texts`.

        Texts are encoded longest first (dynamic padding wastes little); one forward pass per batch
        gives every size, hybrids' parts included. `workers` processes tokenise ahead; on a GPU each
        batch's vectors come back while the next batch runs, so the GPU waits neither for tokenising
        nor for copies. The parts of hybrids from other models are encoded at the same time, each
        model in a thread of its own (on a GPU, on a CUDA stream of its own)."""
        if batch_size < 1:
            raise StarbucksError(f"batch_size = {batch_size!r} must be >= 1")
        sizes = [self.size(s) for s in sizes]
        if not any(s.parts for s in sizes):
            return self._embed(texts, sizes, kind, batch_size, progress, workers, dtype)
        wanted: dict[str, dict[Size, None]] = {"": {}}  # model label ("": this one) -> plain sizes, in order
        for s in sizes:
            for model, part in [(p.model, p.size) for p in s.parts] if s.parts else [("", s)]:
                wanted.setdefault(model, {})[part] = None
        vectors = self._embed_models(
            texts, {m: list(w) for m, w in wanted.items()}, kind, batch_size, progress, workers
        )
        return {
            s: join_parts(s, vectors).astype(dtype, copy=False) if s.parts else vectors[""][s].astype(dtype, copy=False)
            for s in sizes
        }

    def _embed_models(
        self,
        texts: Sequence[str],
        wanted: Mapping[str, list[Size]],
        kind: str | None,
        batch_size: int,
        progress: tqdm | None,
        workers: int,
    ) -> dict[str, dict[Size, np.ndarray]]:
        """float32 vectors of `wanted[label]` from each model (`""`: this one, here; the others, with
        `parallel_parts`, at the same time, each in a thread of its own, else after it); label -> size -> array."""
        others = {label: sizes for label, sizes in wanted.items() if label}
        parallel = self.parallel

        def encode_other(label: str) -> dict[Size, np.ndarray]:
            model = self.part_models[label]
            with model._own_stream() if parallel else nullcontext():
                return model._embed(texts, others[label], kind, batch_size, None, 0, np.float32)

        if not parallel:
            mine = self._embed(texts, wanted[""], kind, batch_size, progress, workers, np.float32) if wanted[""] else {}
            return {"": mine, **{label: encode_other(label) for label in others}}
        with ThreadPoolExecutor(max_workers=max(1, len(others)), thread_name_prefix="part-model") as pool:
            running = {label: pool.submit(encode_other, label) for label in others}
            mine = self._embed(texts, wanted[""], kind, batch_size, progress, workers, np.float32) if wanted[""] else {}
            return {"": mine, **{label: future.result() for label, future in running.items()}}

    @property
    def parallel(self) -> bool:
        """Whether other models' parts are encoded at the same time as this model's (`parallel_parts`)."""
        value = self.parallel_parts
        if value == "auto":
            return self.device.type == "cuda"
        if not isinstance(value, bool):
            raise StarbucksError(f"parallel_parts = {value!r} is not one of auto, true, false")
        return value

    def _own_stream(self):
        """A CUDA stream of this model's own for the block (the kernels of two models' threads then overlap on
        one GPU); nothing on the CPU."""
        if self.device.type != "cuda":
            return nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(self.device))

    def _embed(
        self,
        texts: Sequence[str],
        sizes: Sequence[Size],
        kind: str | None,
        batch_size: int,
        progress: tqdm | None,
        workers: int,
        dtype,
    ) -> dict[Size, np.ndarray]:
        """`embed_texts` of plain sizes of this model."""
        sizes = [self.encoder.check(s) for s in sizes]
        max_length, prefix = self.side(kind)
        out = {s: np.empty((len(texts), s.dim), dtype=dtype) for s in sizes}
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = self.device
        cuda = device.type == "cuda"
        batches = _TokenizedBatches(self.tokenizer, texts, order, batch_size, max_length, prefix)
        workers = min(workers, len(batches) - 1) if len(batches) > 1 else 0
        loader = torch.utils.data.DataLoader(
            batches,
            batch_size=None,
            num_workers=workers,
            pin_memory=cuda,
            worker_init_fn=_quiet_tokenizers if workers else None,
            prefetch_factor=4 if workers else None,
        )
        tensor_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype

        def collect(rows, vectors, done) -> None:
            if done is not None:
                done.synchronize()
            for size, v in vectors.items():
                out[size][rows] = v.numpy()
            if progress is not None:
                progress.update(len(rows))

        with torch.inference_mode(), autocast_context(device, resolve_precision(self.precision, device, "precision")):
            previous = None
            for rows, batch in loader:
                self._check_positions(batch["input_ids"].shape[1], kind)
                batch = {k: v.to(device, non_blocking=cuda) for k, v in batch.items()}
                vectors = {size: v.to(tensor_dtype) for size, v in self.encoder.embed(batch, sizes).items()}
                done = None
                if cuda:  # copy back without waiting; wait only once the next batch is queued
                    vectors = {size: v.to("cpu", non_blocking=True) for size, v in vectors.items()}
                    done = torch.cuda.Event()
                    done.record()
                else:
                    vectors = {size: v.cpu() for size, v in vectors.items()}
                if previous is not None:
                    collect(*previous)
                previous = (rows, vectors, done)
            if previous is not None:
                collect(*previous)
        return out

    # ------------------------------------------------------------ saving

    def save(self, directory: str | os.PathLike, meta: Mapping | None = None) -> None:
        """Write a checkpoint of this toolkit (HF model, `starbucks.json`, sentence-transformers files,
        model card) with this model's settings; `meta` adds or replaces entries of `starbucks.json`."""
        kept = {k: v for k, v in self.meta.items() if k not in ("format_version", "pooling", "normalize")}
        record = {
            **kept,
            "sizes": self.sizes.to_config(),
            "query_max_length": self.query_max_length,
            "passage_max_length": self.passage_max_length,
            "query_prefix": self.query_prefix,
            "passage_prefix": self.passage_prefix,
            **(meta or {}),
        }
        save_encoder(self.encoder, directory, self.tokenizer, record)  # the encoder records pooling and normalize

    def __repr__(self) -> str:
        return (
            f"StarbucksModel({self.source!r}, {self.pooling} pooling, normalize={self.normalize}, "
            f"sizes={', '.join(str(s) for s in self.sizes)}, device={self.device})"
        )


def join_parts(size: Size, vectors: Mapping[str, Mapping[Size, np.ndarray]]) -> np.ndarray:
    """A hybrid's vectors: its parts' (`vectors[model label][part size]`, float32) end to end, each scaled
    by `sqrt(weight)`, so that the inner product of two is the weighted sum of the parts' inner products.
    Each part is normalised (or not) as its model was trained; the whole is not normalised again."""
    pieces = []
    for p in size.parts:
        v = np.asarray(vectors[p.model][p.size], dtype=np.float32)
        pieces.append(v if p.weight == 1 else v * np.float32(math.sqrt(p.weight)))
    return np.concatenate(pieces, axis=1)


__all__ = ["StarbucksModel", "checkpoint_meta", "join_parts"]
