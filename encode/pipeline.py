"""Corpus and queries -> per-size float16 embedding shards (`retrieval.store` layout).

The corpus is streamed in blocks of `encode.shard_rows` passages; block `k` becomes shard `k`
of every requested size. Inside a block passages are sorted by length and encoded in batches
with dynamic padding, one forward pass to the deepest requested layer for all sizes, and put
back in corpus order before the shard is written. Finished shards are skipped on restart.
Workers (`--shard i/n`, torchrun ranks, or both) own the blocks `k` with `k % n == i`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from retrieval.config import experiment_paths, sizes_of
from retrieval.data import corpus_size, iter_corpus, load_eval_splits
from retrieval.errors import StarbucksError
from retrieval.settings import autocast_context, local_rank, resolve_device, resolve_precision, whole_number
from retrieval.modeling import StarbucksEncoder, load_encoder, meta_sizes, read_meta, resolve_model_path, tokenize
from retrieval.sizes import Size, SizeList
from retrieval.store import EmbeddingStore, IdsHasher, check_ids, embedding_identity, model_fingerprint

_SLICE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


# ---------------------------------------------------------------- work split


@dataclass(frozen=True)
class Slice:
    """Worker `index` of `count`: it owns the corpus blocks `k` with `k % count == index`."""

    index: int = 0
    count: int = 1

    def owns(self, block: int) -> bool:
        return block % self.count == self.index

    @property
    def is_first(self) -> bool:
        return self.index == 0

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_slice(spec: str | None) -> Slice:
    """`"i/n"` -> Slice(i, n); None or empty -> the whole corpus."""
    if spec in (None, ""):
        return Slice()
    m = _SLICE.match(str(spec))
    if not m or not int(m.group(1)) < int(m.group(2)):
        raise StarbucksError(f"shard {spec!r} is not 'i/n' with 0 <= i < n (e.g. --shard 0/4)")
    return Slice(int(m.group(1)), int(m.group(2)))


def worker_slice(spec: str | None, env: Mapping[str, str] = os.environ) -> Slice:
    """This process's slice: `--shard i/n` subdivided among the launcher's ranks.

    Ranks come from torchrun (`RANK`, `WORLD_SIZE`) or, without it, from `srun`
    (`SLURM_PROCID`, `SLURM_NTASKS`).
    """
    outer = parse_slice(spec)
    if "RANK" in env:
        rank, world = int(env["RANK"]), int(env.get("WORLD_SIZE", 1))
    else:
        rank, world = int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1))
    return Slice(outer.index * world + rank, outer.count * world)


# ---------------------------------------------------------------- model


@dataclass
class EncodingModel:
    """An encoder with everything encode needs to know about how it was trained."""

    encoder: StarbucksEncoder
    tokenizer: object
    source: str
    sizes: SizeList
    query_max_length: int
    passage_max_length: int
    query_prefix: str
    passage_prefix: str
    fingerprint: str

    def identity(self, size: Size, kind: str) -> dict:
        """The identity record of `size`'s embeddings of `kind` (`query` or `passage`)."""
        query = kind == "query"
        return embedding_identity(
            self.fingerprint, size, self.encoder.pooling, self.encoder.normalize,
            self.query_max_length if query else self.passage_max_length,
            self.query_prefix if query else self.passage_prefix,
        )


def model_source(cfg: DictConfig) -> str:
    """`encode.model` if set, else the experiment's trained model if there is one, else the backbone."""
    if cfg.encode.get("model"):
        return str(cfg.encode.model)
    trained = experiment_paths(cfg).model
    if (trained / "config.json").is_file():
        return str(trained)
    return str(cfg.model.name_or_path)


def load_model(cfg: DictConfig, device: torch.device) -> EncodingModel:
    """Load the encoder; pooling, normalisation, sizes and lengths come from its `starbucks.json`.

    A plain HF model (zero-shot) takes them from the config's `model` section and `sizes`.
    """
    source = model_source(cfg)
    meta = read_meta(resolve_model_path(source)) or {}
    m = cfg.model
    encoder, tokenizer, _ = load_encoder(
        source,
        pooling=meta.get("pooling", m.pooling),
        normalize=meta.get("normalize", m.normalize),
        attn_implementation=m.attn_implementation,
    )
    encoder.eval().to(device)
    encoder.packing = m.packing
    sizes = meta_sizes(meta) or sizes_of(cfg)
    return EncodingModel(
        encoder=encoder,
        tokenizer=tokenizer,
        source=source,
        sizes=sizes,
        query_max_length=int(meta.get("query_max_length", m.query_max_length)),
        passage_max_length=int(meta.get("passage_max_length", m.passage_max_length)),
        query_prefix=str(meta.get("query_prefix", m.query_prefix) or ""),
        passage_prefix=str(meta.get("passage_prefix", m.passage_prefix) or ""),
        fingerprint=model_fingerprint(encoder),
    )


# ---------------------------------------------------------------- encoding


class _TokenizedBatches(torch.utils.data.Dataset):
    """Item `n`: the rows and tokenised texts of the `n`-th batch of `order` (for a DataLoader, whose
    worker processes then tokenise while the GPU encodes; it holds the tokenizer, not the model)."""

    def __init__(self, tokenizer, texts: Sequence[str], order: list[int], batch_size: int, max_length: int,
                 prefix: str):
        self.tokenizer, self.texts, self.order, self.batch_size = tokenizer, texts, order, batch_size
        self.max_length, self.prefix = max_length, prefix

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __getitem__(self, n: int):
        rows = self.order[n * self.batch_size:(n + 1) * self.batch_size]
        batch = tokenize(self.tokenizer, [self.texts[i] for i in rows], self.max_length, self.prefix)
        return rows, dict(batch)


def _quiet_tokenizers(_worker: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # a forked worker tokenises on its own core


def loader_workers(value, device: torch.device) -> int:
    """`encode.dataloader_workers`: a whole number >= 0, or auto (on a GPU up to 8 tokenising
    processes per encoding process, sharing the cores with the other ranks of a torchrun and
    leaving one each for them; on the CPU none: the cores encode)."""
    value = whole_number(value, "encode.dataloader_workers", 0, auto=True)
    if value == "auto":
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        return max(0, min(8, (os.cpu_count() or 1) // ranks - 1)) if device.type == "cuda" else 0
    return value


def encode_texts(model: EncodingModel, texts: Sequence[str], sizes: Sequence[Size], kind: str,
                 batch_size: int, device: torch.device, precision: str = "auto",
                 progress: tqdm | None = None, workers: int = 0) -> dict[Size, np.ndarray]:
    """Float16 `(len(texts), dim)` embeddings per size, in the order of `texts`.

    Texts are encoded longest first (dynamic padding wastes little); one forward pass per
    batch gives every size. `workers` processes tokenise ahead; on a GPU each batch's vectors
    come back while the next batch runs, so the GPU waits neither for tokenising nor for copies.
    """
    out = {s: np.empty((len(texts), s.dim), dtype=np.float16) for s in sizes}
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    cuda = device.type == "cuda"
    query = kind == "query"
    batches = _TokenizedBatches(model.tokenizer, texts, order, batch_size,
                                model.query_max_length if query else model.passage_max_length,
                                model.query_prefix if query else model.passage_prefix)
    workers = min(workers, len(batches) - 1) if len(batches) > 1 else 0
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers, pin_memory=cuda,
                                         worker_init_fn=_quiet_tokenizers if workers else None,
                                         prefetch_factor=4 if workers else None)

    def collect(rows, vectors, done) -> None:
        if done is not None:
            done.synchronize()
        for size, v in vectors.items():
            out[size][rows] = v.numpy()
        if progress is not None:
            progress.update(len(rows))

    with torch.inference_mode(), autocast_context(device, resolve_precision(precision, device, "encode.precision")):
        previous = None
        for rows, batch in loader:
            batch = {k: v.to(device, non_blocking=cuda) for k, v in batch.items()}
            vectors = {size: v.to(torch.float16) for size, v in model.encoder.embed(batch, sizes).items()}
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


def iter_blocks(pairs: Iterable[tuple[str, str]], rows: int) -> Iterator[tuple[int, list[str], list[str]]]:
    """`(block, ids, texts)` for consecutive blocks of `rows` passages."""
    it = iter(pairs)
    for k in range(sys.maxsize):
        block = list(islice(it, rows))
        if not block:
            return
        ids, texts = zip(*block)
        yield k, list(ids), list(texts)


def _query_splits(cfg: DictConfig):
    names = cfg.encode.splits
    if not cfg.data.eval_splits:
        return {}
    return load_eval_splits(cfg.data.eval_splits, names if isinstance(names, str) else list(names))


@dataclass
class EncodeSummary:
    """What one encode call did."""

    sizes: list[Size]
    slice: Slice
    passages_total: int
    passages_encoded: int
    seconds: float
    complete: bool
    directories: list[Path]


def encode_collection(cfg: DictConfig, progress: bool = True) -> EncodeSummary:
    """Encode this worker's slice of the corpus (and, on worker 0, the eval queries) for the selected sizes."""
    enc = cfg.encode
    shard_rows = int(enc.shard_rows)
    if shard_rows < 1 or int(enc.batch_size) < 1:
        raise StarbucksError("encode.shard_rows and encode.batch_size must be >= 1")
    work = worker_slice(enc.shard)
    progress = progress and local_rank() == 0  # one progress bar per machine
    device = resolve_device(enc.device, "encode.device")
    workers = loader_workers(enc.dataloader_workers, device)
    model = load_model(cfg, device)
    sizes = list(model.sizes.select(enc.sizes))
    for s in sizes:
        model.encoder.check(s)
    root = experiment_paths(cfg).embeddings
    stores = {s: EmbeddingStore(root / s.name) for s in sizes}
    for s, store in stores.items():
        store.start({**model.identity(s, "passage"), "shard_rows": shard_rows},
                    info={"model": model.source, "corpus": str(cfg.data.corpus)})
    print(f"encode: model {model.source} ({model.encoder.pooling} pooling, normalize={model.encoder.normalize}); "
          f"sizes {', '.join(str(s) for s in sizes)}; worker {work}; device {device}", file=sys.stderr)

    if work.is_first:
        _encode_queries(cfg, model, stores, device, progress)

    total = corpus_size(str(cfg.data.corpus))
    bar = tqdm(total=None if total is None else -(-total // work.count), unit="psg", desc=f"encode {work}",
               disable=not progress, dynamic_ncols=True)
    hasher = IdsHasher()
    encoded, started = 0, time.perf_counter()
    for k, ids, texts in iter_blocks(iter_corpus(str(cfg.data.corpus)), shard_rows):
        hasher.update(ids)
        if not work.owns(k):
            continue
        check_ids(ids, f"corpus {cfg.data.corpus}")
        todo = [s for s in sizes if not stores[s].has_shard(k)]
        for s in sizes:
            if s not in todo and stores[s].read_ids(k) != ids:
                raise StarbucksError(
                    f"{stores[s].ids_path(k)} lists other passages than block {k} of the corpus; the corpus changed "
                    f"since it was encoded: delete {stores[s].dir} and re-encode"
                )
        if not todo:
            continue
        vectors = encode_texts(model, texts, todo, "passage", int(enc.batch_size), device, enc.precision, bar, workers)
        for s in todo:
            stores[s].write_shard(k, ids, vectors[s])
        encoded += len(ids)
    bar.close()
    seconds = time.perf_counter() - started

    finished = [stores[s].finalize(hasher.count, hasher.hexdigest()) for s in sizes]
    complete = all(m is not None for m in finished)
    rate = f" ({encoded / seconds:.1f} passages/s)" if encoded and seconds > 0 else ""
    state = "complete" if complete else "waiting for the other slices"
    print(f"encode: worker {work} encoded {encoded} of {hasher.count} passages in {seconds:.1f}s{rate}; "
          f"embeddings {state} in {root}", file=sys.stderr)
    return EncodeSummary(sizes, work, hasher.count, encoded, seconds, complete, [stores[s].dir for s in sizes])


def _encode_queries(cfg: DictConfig, model: EncodingModel, stores: Mapping[Size, EmbeddingStore],
                    device: torch.device, progress: bool) -> None:
    """Encode each eval split's queries for the sizes whose query file is missing or stale."""
    for name, split in _query_splits(cfg).items():
        ids = list(split.queries)
        todo = [s for s, st in stores.items() if not st.queries_up_to_date(name, ids, model.identity(s, "query"))]
        if not todo or not ids:
            continue
        check_ids(ids, f"eval split {name!r}")
        bar = tqdm(total=len(ids), unit="q", desc=f"queries {name}", disable=not progress, dynamic_ncols=True)
        vectors = encode_texts(model, [split.queries[q] for q in ids], todo, "query",
                               int(cfg.encode.batch_size), device, cfg.encode.precision, bar)
        bar.close()
        for s in todo:
            stores[s].write_queries(name, ids, vectors[s], model.identity(s, "query"), info={"model": model.source})
