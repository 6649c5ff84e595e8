"""Corpus and queries -> per-size float16 embedding shards (`retrieval.store` layout).

The corpus is streamed in blocks of `encode.shard_rows` passages; block `k` becomes shard `k`
of every requested size. Inside a block passages are sorted by length and encoded in batches
with dynamic padding, one forward pass to the deepest requested layer for all sizes, and put
back in corpus order before the shard is written. Finished shards are skipped on restart; a shard
that lists other passages than its block is refused. Workers (`--shard i/n`, torchrun ranks, or
both) own the blocks `k` with `k % n == i`. The loop is the library's (`retrieval.ranking`:
`encode_passages`, `encode_queries`), which the suite runs too.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from retrieval.config import experiment_paths, sizes_of
from retrieval.data import corpus_size, iter_corpus, load_eval_splits
from retrieval.errors import StarbucksError
from retrieval.model import SETTINGS, StarbucksModel
from retrieval.ranking import corpus_blocks, encode_passages, encode_queries, open_stores
from retrieval.settings import local_rank, resolve_device, resolve_precision, whole_number
from retrieval.sizes import Size
from retrieval.lock import run_lock

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


def model_source(cfg: DictConfig) -> str:
    """`encode.model` if set, else the experiment's trained model; without one, one line saying to train
    first (or to name the backbone for zero-shot embeddings): never the backbone under the run's name."""
    if cfg.encode.get("model"):
        return str(cfg.encode.model)
    trained = experiment_paths(cfg).model
    if (trained / "config.json").is_file():
        return str(trained)
    raise StarbucksError(
        f"no trained model in {trained}; run `python -m train` with this config first, or encode the backbone "
        f"zero-shot with encode.model={cfg.model.name_or_path} (best under another name=...)"
    )


def load_model(cfg: DictConfig, device: torch.device) -> StarbucksModel:
    """Load the encoder; pooling, normalisation, sizes and lengths come from its `starbucks.json`.

    A plain HF model (zero-shot) takes them from the config's `model` section and `sizes`. The models of
    hybrid sizes' `@label` parts (`encode.part_models`) are loaded beside it, each with its own settings.
    """
    m = cfg.model
    model = StarbucksModel.from_pretrained(
        model_source(cfg),
        device,
        attn_implementation=m.attn_implementation,
        precision=resolve_precision(cfg.encode.precision, device, "encode.precision"),
        defaults={**{k: m[k] for k in SETTINGS}, "sizes": sizes_of(cfg)},
        part_models={str(k): str(v) for k, v in (cfg.encode.part_models or {}).items()},
        parallel_parts=cfg.encode.parallel_parts,
    )
    for one in (model, *model.part_models.values()):
        one.encoder.packing = m.packing
    return model


# ---------------------------------------------------------------- encoding


def loader_workers(value, device: torch.device) -> int:
    """`encode.dataloader_workers`: a whole number >= 0, or auto (on a GPU up to 8 tokenising
    processes per encoding process, sharing the cores with the other ranks of a torchrun and
    leaving one each for them; on the CPU none: the cores encode)."""
    value = whole_number(value, "encode.dataloader_workers", 0, auto=True)
    if value == "auto":
        ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        return max(0, min(8, (os.cpu_count() or 1) // ranks - 1)) if device.type == "cuda" else 0
    return value


def encode_texts(
    model: StarbucksModel,
    texts: Sequence[str],
    sizes: Sequence[Size],
    kind: str,
    batch_size: int,
    progress: tqdm | None = None,
    workers: int = 0,
) -> dict[Size, np.ndarray]:
    """`(len(texts), dim)` embeddings per size in the store's float16, in the order of `texts`
    (`StarbucksModel.embed_texts`: longest first, one pass for every size, `workers` tokenising ahead)."""
    return model.embed_texts(texts, sizes, kind, batch_size, progress, workers, dtype=np.float16)


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
    """Encode this worker's slice of the corpus (and, on worker 0, the eval queries) for the selected sizes.

    Two processes encoding the same slice into one embeddings directory at once: the second stops with one line."""
    work = worker_slice(cfg.encode.shard)
    with run_lock(
        experiment_paths(cfg).embeddings, f"encode (slice {work})", f".lock-encode-{work.index}of{work.count}"
    ):
        return _encode_collection(cfg, work, progress)


def _encode_collection(cfg: DictConfig, work: Slice, progress: bool) -> EncodeSummary:
    enc = cfg.encode
    shard_rows = int(enc.shard_rows)
    progress = progress and local_rank() == 0  # one progress bar per machine
    device = resolve_device(enc.device, "encode.device")
    workers = loader_workers(enc.dataloader_workers, device)
    model = load_model(cfg, device)
    sizes = [model.size(s) for s in model.sizes.select(enc.sizes)]
    root = experiment_paths(cfg).embeddings
    stores = open_stores(model, sizes, root, shard_rows, {"model": model.source, "corpus": str(cfg.data.corpus)})
    print(
        f"encode: model {model.source} ({model.encoder.pooling} pooling, normalize={model.encoder.normalize}); "
        f"sizes {', '.join(str(s) for s in sizes)}; worker {work}; device {device}",
        file=sys.stderr,
    )

    if work.is_first:
        for name, split in _query_splits(cfg).items():
            encode_queries(model, stores, name, split.queries, int(enc.batch_size), progress)

    total = corpus_size(str(cfg.data.corpus))
    bar = tqdm(
        total=None if total is None else -(-total // work.count),
        unit="psg",
        desc=f"encode {work}",
        disable=not progress,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    done = encode_passages(
        model,
        stores,
        corpus_blocks(iter_corpus(str(cfg.data.corpus)), shard_rows),
        f"corpus {cfg.data.corpus}",
        int(enc.batch_size),
        owns=work.owns,
        progress=bar,
        workers=workers,
        note=_note,
    )
    bar.close()
    seconds = time.perf_counter() - started
    encoded, complete = done.encoded, done.complete
    rate = f" ({encoded / seconds:.1f} passages/s)" if encoded and seconds > 0 else ""
    state = "complete" if complete else "waiting for the other slices"
    print(
        f"encode: worker {work} encoded {encoded} of {done.count} passages in {seconds:.1f}s{rate}; "
        f"embeddings {state} in {root}",
        file=sys.stderr,
    )
    return EncodeSummary(sizes, work, done.count, encoded, seconds, complete, [stores[s].dir for s in sizes])


def _note(line: str) -> None:
    print(f"encode: {line}", file=sys.stderr)
