"""`python -m train.mine`: hard negatives for a split's queries, from BM25 or a dense model at any size.

    python -m train.mine --config C [--split train] [--retriever bm25 | MODEL] [--size demi]
        [--depth 200] [--negatives 30] [--skip-top K] [--out FILE]

Every query of the split with a positive judgment (its queries and qrels come from
`data.eval_splits.<split>` when configured, else from the BEIR directory `data.corpus`,
`qrels/<split>.tsv`) is ranked against the whole corpus to `--depth`: by BM25 (`bm25s`), or by a
dense model of this toolkit at one size (exact inner-product search of that size's embeddings).
Its positives are dropped from the ranking, then the first `--skip-top` of what remains (likely
false negatives), and the next `--negatives` become its hard negatives, top-ranked first. The
groups are written in the toolkit's ids-only JSONL (`retrieval.data.load_train_groups`).

Dense mining runs the library's ranking loop (`retrieval.ranking`) over the corpus in blocks of
`--shard-rows` passages, encoded in memory (float32, not the store's float16: mining ranks as the
model scores); each block's top-k for all queries is kept under `<out>.parts/`, so a killed run
resumes at the first unfinished block.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from omegaconf import OmegaConf
from tqdm import tqdm

from retrieval.bm25 import BM25
from retrieval.cli import parse_stage_args, stage_parser
from retrieval.config import experiment_paths, sizes_of
from retrieval.data import EvalSplit, iter_corpus, load_split
from retrieval.errors import StarbucksError, cli_entry
from retrieval.io import atomic_path, atomic_write_gzip, atomic_write_json, atomic_write_text
from retrieval.ranking import ExactRanking, corpus_blocks, default_searcher, ranked
from retrieval.settings import whole_number
from retrieval.store import ids_sha256, texts_sha256

BM25_NAME = "bm25"


@dataclass(frozen=True)
class MineSettings:
    """What to mine: which queries, ranked by what, and how the ranking becomes negatives."""

    split: str = "train"
    retriever: str = BM25_NAME  # bm25, or a model directory / hub id
    size: str | None = None  # dense: a size of the model (name or LxD); None: its largest
    depth: int = 200
    negatives: int = 30
    skip_top: int = 0
    out: str | None = None
    stemmer: str | None = None  # bm25: a PyStemmer language (english); None: no stemming
    shard_rows: int = 100_000  # dense: passages per corpus block (the unit of resuming)
    batch_size: int = 128  # dense: encoding batch size
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name in ("depth", "negatives", "shard_rows", "batch_size", "skip_top"):
            whole_number(getattr(self, name), f"--{name.replace('_', '-')}", minimum=0 if name == "skip_top" else 1)
        if self.retriever == BM25_NAME and self.size is not None:
            raise StarbucksError(
                "--size is for a dense retriever; BM25 has no sizes (drop --size or pass --retriever MODEL)"
            )

    @property
    def is_bm25(self) -> bool:
        return self.retriever == BM25_NAME


# ---------------------------------------------------------------- queries and positives


def mining_split(cfg, name: str) -> EvalSplit:
    """The split's queries and qrels: `data.eval_splits.<name>` if configured, else `qrels/<name>.tsv`
    of the BEIR directory `data.corpus`."""
    splits = cfg.data.eval_splits or {}
    source = splits[name] if name in splits else str(cfg.data.corpus)
    if name not in splits and not Path(source).is_dir():
        raise StarbucksError(
            f"split {name!r} has no queries and qrels: data.corpus = {source!r} is not a BEIR directory and "
            f"data.eval_splits has no {name!r} (configured: {sorted(splits)}); add data.eval_splits.{name}"
        )
    return load_split(name, source)


def positives_of(split: EvalSplit) -> dict[str, set[str]]:
    """Query id -> its relevant passages (relevance > 0), for the queries that have any."""
    positives = {q: {d for d, rel in judged.items() if rel > 0} for q, judged in split.qrels.items()}
    positives = {q: docs for q, docs in positives.items() if docs}
    if not positives:
        raise StarbucksError(
            f"split {split.name!r} has no qrels with relevance > 0, so no query has a positive to train on; "
            "give a qrels file with the split's relevant passages"
        )
    return positives


def select_negatives(ranked: Sequence[str], positives: set[str], count: int, skip_top: int) -> list[str]:
    """The ranking without the positives, minus its first `skip_top`, cut to `count` (top-ranked first)."""
    rest = [d for d in ranked if d not in positives]
    return rest[skip_top : skip_top + count]


# ---------------------------------------------------------------- rankings


def bm25_rankings(
    ids: Sequence[str],
    texts: Sequence[str],
    queries: Mapping[str, str],
    depth: int,
    stemmer: str | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """Query id -> the BM25 top `depth` passage ids (score > 0), best first."""
    bm25 = BM25(ids, texts, stemmer=stemmer, progress=progress)
    return {
        q: [d for d, _ in bm25.search(text, depth)]
        for q, text in tqdm(queries.items(), desc="BM25 ranking", unit="q", disable=not progress)
    }


class MiningParts:
    """`<out>.parts/`: what a dense mining run has finished, one top-k file per corpus block.

    `meta.json` records what the parts were computed with (model weights, size, encoding settings,
    queries, depth, block size); a rerun with other settings is refused rather than mixed. Each part
    records its block's passage ids by the embedding store's hash (`retrieval.store.ids_sha256`)."""

    def __init__(self, directory: Path, identity: dict):
        self.dir = directory
        identity = json.loads(json.dumps(identity))  # as it reads back
        meta = directory / "meta.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != identity:
                changed = sorted(k for k in identity.keys() | found.keys() if identity.get(k) != found.get(k))
                raise StarbucksError(
                    f"{directory} holds a mining run with other settings ({', '.join(changed)}); delete it to "
                    f"start over, or rerun with the settings it was started with"
                )
        else:
            atomic_write_json(meta, identity)

    def path(self, block: int) -> Path:
        return self.dir / f"topk-{block:05d}.npz"

    def load(self, block: int, ids: Sequence[str]):
        """The block's `(scores, rows)` if finished (for these passages), else None."""
        path = self.path(block)
        if not path.is_file():
            return None
        with np.load(path) as part:
            if str(part["ids_sha256"]) != ids_sha256(ids):
                raise StarbucksError(
                    f"{path} was mined from other passages than block {block} of the corpus "
                    f"(the corpus changed); delete {self.dir} and mine again"
                )
            return part["scores"], part["rows"]

    def save(self, block: int, ids: Sequence[str], scores: np.ndarray, rows: np.ndarray) -> None:
        with atomic_path(self.path(block)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, scores=scores, rows=rows, ids_sha256=np.array(ids_sha256(ids)))


def dense_rankings(cfg, settings: MineSettings, queries: Mapping[str, str], parts_dir: Path) -> dict[str, list[str]]:
    """Query id -> the top `depth` passage ids by exact inner-product search at one size of a model
    (`settings.retriever`), best first: the library's ranking loop (`retrieval.ranking`) over corpus blocks
    encoded in memory, each block's top-k kept in `parts_dir` (`MiningParts`)."""
    from retrieval.model import StarbucksModel

    defaults = {**OmegaConf.to_container(cfg.model, resolve=True), "sizes": sizes_of(cfg)}
    model = StarbucksModel.from_pretrained(settings.retriever, device=settings.device, defaults=defaults)
    size = model.size(settings.size or model.sizes.largest)
    qids = list(queries)
    parts = MiningParts(
        parts_dir,
        {
            "passages": model.identity(size, "passage"),
            "queries": model.identity(size, "query"),
            "query_ids_sha256": ids_sha256(qids),
            "query_texts_sha256": texts_sha256(queries[q] for q in qids),
            "depth": settings.depth,
            "shard_rows": settings.shard_rows,
            "corpus": str(cfg.data.corpus),
        },
    )
    print(
        f"mine: {model.source} at size {size}; blocks of {settings.shard_rows} passages in {parts_dir}", file=sys.stderr
    )
    started = time.perf_counter()
    q = model.embed_texts([queries[i] for i in qids], [size], "query", settings.batch_size)[size]
    ranking = ExactRanking(q, settings.depth, default_searcher(model.device))
    corpus_ids: list[str] = []
    bar = tqdm(unit="psg", desc=f"mine {size.name}", disable=not settings.progress, dynamic_ncols=True)
    for block, ids, texts in corpus_blocks(iter_corpus(str(cfg.data.corpus)), settings.shard_rows):
        found = parts.load(block, ids)
        if found is None:
            found = ranking.search(model.embed_texts(texts, [size], "passage", settings.batch_size, progress=bar)[size])
            parts.save(block, ids, *found)
        else:
            bar.update(len(ids))
        ranking.add(found, len(corpus_ids))
        corpus_ids.extend(ids)
    bar.close()
    seconds = time.perf_counter() - started
    print(
        f"mine: {len(qids)} queries ranked against {len(corpus_ids)} passages at {size} in {seconds:.1f}s "
        f"({len(corpus_ids) / seconds:.0f} passages/s, blocks already finished included)",
        file=sys.stderr,
    )
    return {qid: [d for d, _ in hits] for qid, hits in ranked(qids, ranking.scores, ranking.rows, corpus_ids)}


# ---------------------------------------------------------------- output


def group_rows(
    split: EvalSplit,
    positives: Mapping[str, set[str]],
    rankings: Mapping[str, Sequence[str]],
    negatives: int,
    skip_top: int,
) -> Iterable[dict]:
    """One ids-only training group per query with positives, in the split's query order."""
    for q, text in split.queries.items():
        if q not in positives:
            continue
        yield {
            "query_id": q,
            "query": text,
            "positive_document_ids": sorted(positives[q]),
            "negative_document_ids": select_negatives(rankings.get(q, ()), positives[q], negatives, skip_top),
        }


def write_groups(path: Path, rows: Iterable[dict]) -> tuple[int, int]:
    """Write the groups as JSONL (gzipped for `.gz`), atomically; groups without negatives are left
    out. Returns `(written, left out)`."""
    kept, empty = [], 0
    for row in rows:
        if row["negative_document_ids"]:
            kept.append(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            empty += 1
    if not kept:
        raise StarbucksError(
            "no query got a hard negative (the rankings held nothing but positives); raise --depth or lower --skip-top"
        )
    if path.suffix == ".gz":
        atomic_write_gzip(path, kept)
    else:
        atomic_write_text(path, "".join(kept))
    return len(kept), empty


def default_out(cfg, settings: MineSettings) -> Path:
    if settings.is_bm25:
        tag = BM25_NAME
    else:
        tag = Path(settings.retriever.rstrip("/")).name + (f"-{settings.size}" if settings.size else "")
    return experiment_paths(cfg).root / "mined" / f"{settings.split}-{tag}.jsonl.gz"


# ---------------------------------------------------------------- the stage


@dataclass
class MineSummary:
    """What one mining call wrote."""

    path: Path
    groups: int
    without_negatives: int


def mine(cfg, settings: MineSettings) -> MineSummary:
    """Mine hard negatives for `settings.split` and write the training groups; returns where they went."""
    split = mining_split(cfg, settings.split)
    positives = positives_of(split)
    queries = {q: split.queries[q] for q in split.queries if q in positives}
    out = Path(settings.out) if settings.out else default_out(cfg, settings)
    depth = settings.depth
    corpus = str(cfg.data.corpus)
    print(
        f"mine: {len(queries)} queries of split {settings.split!r}; retriever {settings.retriever}"
        f"{f' at size {settings.size}' if settings.size else ''}; depth {depth}",
        file=sys.stderr,
    )
    if settings.is_bm25:
        ids, texts = [], []
        for doc_id, text in tqdm(iter_corpus(corpus), desc="reading corpus", unit="psg", disable=not settings.progress):
            ids.append(doc_id)
            texts.append(text)
        rankings = bm25_rankings(ids, texts, queries, depth, settings.stemmer, settings.progress)
    else:
        parts = out.with_name(out.name + ".parts")
        rankings = dense_rankings(cfg, settings, queries, parts)
    written, empty = write_groups(out, group_rows(split, positives, rankings, settings.negatives, settings.skip_top))
    if not settings.is_bm25:
        shutil.rmtree(parts)  # the groups are written: the per-block results are no longer needed
    left = f"; {empty} queries had no negative in the top {depth} and are left out" if empty else ""
    print(
        f"mine: wrote {written} training groups to {out}{left}; train on them with "
        f"data.train={out} (their ids point into data.corpus = {corpus})",
        file=sys.stderr,
    )
    return MineSummary(out, written, empty)


def _parser() -> argparse.ArgumentParser:
    parser = stage_parser(
        "train.mine",
        "Mine hard negatives for a split's queries (BM25 or a dense model at any "
        "size) and write ids-only training groups.",
    )
    d = MineSettings()
    parser.add_argument("--split", default=d.split, help="split with qrels whose queries get groups (default: train)")
    parser.add_argument("--retriever", default=d.retriever, help="bm25 (default), or a model directory / hub id")
    parser.add_argument("--size", default=None, help="dense: the size to rank with (name or LxD; default: the largest)")
    parser.add_argument("--depth", type=int, default=d.depth, help=f"ranking depth (default: {d.depth})")
    parser.add_argument(
        "--negatives", type=int, default=d.negatives, help=f"negatives per query (default: {d.negatives})"
    )
    parser.add_argument(
        "--skip-top",
        type=int,
        default=d.skip_top,
        help="drop the first K non-positive hits as likely false negatives (default: 0)",
    )
    parser.add_argument(
        "--out", default=None, help="output JSONL[.gz] (default: <output_dir>/mined/<split>-<retriever>.jsonl.gz)"
    )
    parser.add_argument("--stemmer", default=None, help="bm25: PyStemmer language, e.g. english (default: none)")
    parser.add_argument(
        "--shard-rows",
        type=int,
        default=d.shard_rows,
        help=f"dense: passages per corpus block, the unit of resuming (default: {d.shard_rows})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"dense: encoding batch size (default: {d.batch_size})"
    )
    parser.add_argument("--device", default=d.device, help="dense: auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@cli_entry
def main(argv: Sequence[str] | None = None) -> None:
    cfg, args = parse_stage_args(_parser(), argv)
    settings = MineSettings(
        split=args.split,
        retriever=args.retriever,
        size=args.size,
        depth=args.depth,
        negatives=args.negatives,
        skip_top=args.skip_top,
        out=args.out,
        stemmer=args.stemmer,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    mine(cfg, settings)


if __name__ == "__main__":
    main()
