"""MTEB at any size: a Starbucks model (a checkpoint at each size, or an exported size) through the `mteb` package.

    python -m eval.mteb_task MODEL [MODEL ...] [--sizes demi,short] --collections data/python-docs [--cache DIR]
    python -m eval.mteb_task runs/demo/model --tasks NFCorpus SciFact --name USER/demo   # hub tasks: internet

A local retrieval task (`local_task`) is a collection the suite reads (a BEIR folder: corpus.jsonl,
queries.jsonl, qrels/<split>.tsv; or `irds:<id>`) read by this toolkit's own loaders, so it runs offline
and holds the texts and judgments the suite evaluates. A model goes to MTEB at one size either as
`SizeEncoder` (a `StarbucksModel` at that size: no export needed) or as a sentence-transformers model
(`load_sentence_transformer`: an export of one size, or a checkpoint at its largest size).

Each gets a name of its own in MTEB (`ORG/NAME-SIZE`, `retrieval.card.size_model_name`) and a revision
(`size_revision`: sha256 of the weights the size runs), which key MTEB's result cache. A plain
`SentenceTransformer(folder)` has neither (sentence-transformers reads no name from a folder): MTEB files
every such model under `no_model_name/available` and its default cache hands the second size the first
size's scores. With `--cache DIR` the results land in `DIR/results/<ORG>__<NAME-SIZE>/<revision>/`, the
layout of MTEB's results repository.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

try:
    import mteb
    from mteb.abstasks import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.models import ModelMeta
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.types import PromptType
except ImportError:  # pragma: no cover - the dev extra installs it
    raise ImportError("MTEB evaluation needs the mteb package: pip install 'starbucks-retrieval[mteb]'") from None

from eval.suite import DEFAULT_SPLIT, SuiteCollection, load_collection, parse_collection
from retrieval.card import size_model_name
from retrieval.checkpoint import model_shape, resolve_model_path
from retrieval.data import IRDS, iter_corpus
from retrieval.errors import StarbucksError, cli_entry
from retrieval.model import StarbucksModel, checkpoint_meta
from retrieval.names import parse_names
from retrieval.sizes import Size, meta_sizes
from retrieval.st_format import st_output_dim
from retrieval.store import model_fingerprint
from retrieval.tables import markdown_table

__all__ = ["LocalRetrievalTask", "SizeEncoder", "load_sentence_transformer", "local_task", "run_mteb", "size_revision"]

MAIN_SCORE = "ndcg_at_10"


# ---------------------------------------------------------------- the task


def _content_revision(source: str, split: str) -> str:
    """What identifies a collection's data: sha256 of its corpus, queries and `split` qrels files (the
    `irds:` id itself for ir_datasets)."""
    if source.startswith(IRDS):
        return source
    folder = Path(source)
    sha = hashlib.sha256()
    for path in sorted([*folder.glob("corpus.*"), *folder.glob("queries.*"), *(folder / "qrels").glob(f"{split}.*")]):
        sha.update(f"{path.name}\n".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    return sha.hexdigest()[:16]


class LocalRetrievalTask(AbsTaskRetrieval):
    """An MTEB retrieval task over a collection of this toolkit (`local_task` makes one): the texts are the
    toolkit's (a passage's title and text joined, as the suite encodes them), the qrels its own reader's."""

    spec: SuiteCollection

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        """The corpus, the judged queries and their qrels, in MTEB's in-memory format."""
        if self.data_loaded:
            return
        from datasets import Dataset

        loaded = load_collection(self.spec)  # the split, its qrels checked against the corpus ids
        ids, texts = zip(*iter_corpus(self.spec.source))
        queries = loaded.split.queries
        self.dataset = {
            "default": {
                self.spec.split: {
                    "corpus": Dataset.from_dict({"id": list(ids), "text": list(texts)}),
                    "queries": Dataset.from_dict({"id": list(queries), "text": list(queries.values())}),
                    "relevant_docs": {q: dict(judged) for q, judged in loaded.split.qrels.items()},
                    "top_ranked": None,
                }
            }
        }
        self.data_loaded = True


def local_task(
    collection: str,
    split: str = DEFAULT_SPLIT,
    *,
    languages: Sequence[str] = ("eng-Latn",),
    ignore_identical_ids: bool = False,
) -> LocalRetrievalTask:
    """An MTEB retrieval task over `collection` (`SOURCE` or `NAME=SOURCE`: a BEIR folder or `irds:<id>`),
    its `split` qrels, named after the collection, main score nDCG@10; qrels judging passages outside the
    corpus are refused, as the suite refuses them; `ignore_identical_ids`: BEIR's rule (ArguAna, Quora).
    Its dataset revision is the data's (`_content_revision`)."""
    spec = parse_collection(collection, split, ignore_identical_ids)
    source = spec.source if spec.source.startswith(IRDS) else str(Path(spec.source).resolve())
    metadata = TaskMetadata(
        name=spec.name,
        description=f"{source} ({spec.split} qrels), read by starbucks-retrieval (retrieval.data)",
        dataset={"path": source, "revision": _content_revision(spec.source, spec.split)},
        type="Retrieval",
        category="t2t",
        eval_splits=[spec.split],
        eval_langs=list(languages),
        main_score=MAIN_SCORE,
    )
    # MTEB reads a task's metadata from its class (unloading the data drops an instance's own)
    task_class = type(
        LocalRetrievalTask.__name__,
        (LocalRetrievalTask,),
        {"metadata": metadata, "spec": spec, "ignore_identical_ids": spec.ignore_identical_ids},
    )
    return task_class()


# ---------------------------------------------------------------- the model at one size


def size_revision(module, drop: Sequence = ()) -> str:
    """The first 16 hex digits of the sha256 of `module`'s weights (`retrieval.store.model_fingerprint`),
    without the submodules in `drop` (the layers a size does not run): a size of a checkpoint and the
    export of that size (its layers only) get the same revision."""
    prefixes = tuple(f"{name}." for name, sub in module.named_modules() if any(sub is d for d in drop))
    state = {k: v for k, v in module.state_dict().items() if not k.startswith(prefixes)} if prefixes else None

    class _Weights:  # model_fingerprint reads state_dict() only
        def state_dict(self):
            return state if state is not None else module.state_dict()

    return model_fingerprint(_Weights())[:16]


def _scoring(name: str):
    from mteb.models.model_meta import ScoringFunction

    return ScoringFunction.COSINE if name == "cosine" else ScoringFunction.DOT_PRODUCT


class SizeEncoder(AbsEncoder):
    """A `StarbucksModel` at one size as an MTEB encoder: queries and passages each with their own prefix
    and max length (`encode_queries` / `encode_passages`), early exit at the size's layers, its first `d`
    dims. `name` (`ORG/NAME`) is the base of the MTEB name (default: `retrieval.card.size_model_name`'s)."""

    def __init__(self, model: StarbucksModel, size: str | Size, name: str | None = None):
        self.model = model
        self.size = model.size(size)
        # a hybrid's score is the sum of its parts' inner products: dot product over its joined vectors
        similarity = "dot" if self.size.parts else model.similarity_fn_name
        encoder = model.encoder
        self.mteb_model_meta = ModelMeta.create_empty(
            overwrites=dict(
                name=size_model_name(model.source, model.meta, self.size, name),
                revision=size_revision(encoder.backbone, list(encoder.layers)[self.size.layers :]),
                embed_dim=self.size.dim,
                max_tokens=model.passage_max_length,
                similarity_fn_name=_scoring(similarity),
                framework=["PyTorch"],
                use_instructions=bool(model.query_prefix or model.passage_prefix),
            )
        )

    def encode(
        self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type: PromptType | None = None, **kwargs
    ):
        texts = [text for batch in inputs for text in batch["text"]]
        kind = {PromptType.query: "query", PromptType.document: "passage"}.get(prompt_type)
        return self.model.encode(texts, self.size, kind=kind, batch_size=int(kwargs.get("batch_size") or 32))


def load_sentence_transformer(path: str | Path, name: str | None = None, **kwargs):
    """`SentenceTransformer(path, **kwargs)` for a model saved by this toolkit (an export of one size, or a
    checkpoint: its largest size), whose model card data names the model and its size (`model_name`, which
    MTEB reads) and the weights (`base_model_revision`, MTEB's revision): see `SizeEncoder`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    source = str(path)
    meta = checkpoint_meta(source)  # a folder's starbucks.json, or a hub model's
    if not meta:
        raise StarbucksError(f"{path} is not a model saved by this toolkit (no starbucks.json); export one first")
    layers, hidden = model_shape(resolve_model_path(source))
    sizes = meta_sizes(meta)
    dim = st_output_dim(layers, hidden, sizes)
    size = (
        sizes.largest if sizes and (sizes.largest.layers, sizes.largest.dim) == (layers, dim) else Size("", layers, dim)
    )
    card = SentenceTransformerModelCardData(model_name=size_model_name(path, meta, size, name), local_files_only=True)
    model = SentenceTransformer(resolve_model_path(source), model_card_data=card, **kwargs)
    card.base_model_revision = size_revision(model.transformers_model)
    return model


# ---------------------------------------------------------------- many sizes, many tasks


def _tasks(collections: Sequence[str], hub_tasks: Sequence[str], split: str) -> list:
    tasks = [local_task(c, split) for c in collections]
    if hub_tasks:
        try:
            tasks += list(mteb.get_tasks(tasks=list(hub_tasks)))
        except KeyError as err:
            reason = str(err.args[0] if err.args else err).removeprefix("KeyError: ").rstrip(".")
            raise StarbucksError(f"--tasks: {reason}; mteb.get_tasks() lists MTEB's task names") from None
    if not tasks:
        raise StarbucksError("give --collections DIR (a local task) and/or --tasks NAME (MTEB's hub tasks)")
    return tasks


def run_mteb(
    models: Sequence[str],
    collections: Sequence[str] = (),
    hub_tasks: Sequence[str] = (),
    sizes=None,
    split: str = DEFAULT_SPLIT,
    cache: str | Path | None = None,
    name: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    overwrite: str = "only-missing",
) -> dict[str, dict[str, float]]:
    """Evaluate every model (a checkpoint of this toolkit or an export) at every size of `sizes` (default:
    all of the model's) on every task with `mteb.evaluate`; results cached in `cache` (MTEB's layout; None:
    MTEB's default, `~/.cache/mteb` or `$MTEB_CACHE`). Returns MTEB name -> task -> main score (nDCG@10)."""
    from mteb.cache import ResultCache

    tasks = _tasks(collections, hub_tasks, split)
    result_cache = ResultCache(cache_path=cache) if cache is not None else ResultCache()
    scores: dict[str, dict[str, float]] = {}
    for path in models:
        model = StarbucksModel.from_pretrained(path, device)  # auto: a GPU when there is one
        for size in [model.size(s) for s in (parse_names(sizes) or [s.name for s in model.sizes])]:
            encoder = SizeEncoder(model, size, name)
            meta = encoder.mteb_model_meta
            print(f"mteb: {meta.name} (revision {meta.revision}) on {len(tasks)} tasks", file=sys.stderr)
            try:
                result = mteb.evaluate(
                    encoder,
                    tasks,
                    cache=result_cache,
                    overwrite_strategy=overwrite,
                    encode_kwargs={"batch_size": batch_size},
                    show_progress_bar=False,
                )
            except ConnectionError as err:  # a hub task's data, offline
                raise StarbucksError(
                    f"{str(err).splitlines()[0]}: MTEB's hub tasks (--tasks) download their data; run with internet and "
                    f"HF_HUB_OFFLINE unset (make sets it to 1), or evaluate local collections (--collections DIR)"
                ) from None
            scores[meta.name] = {r.task_name: float(r.get_score()) for r in result.task_results}
    return scores


def scores_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """Model at size x task, the main score (a markdown table)."""
    tasks = list(dict.fromkeys(t for row in scores.values() for t in row))
    rows = [[model, *(f"{row[t]:.4f}" if t in row else "" for t in tasks)] for model, row in scores.items()]
    return markdown_table(["model (size)", *tasks], rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.mteb_task", description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="checkpoints of this toolkit (runs/<name>/model) or exports of a size")
    p.add_argument("--sizes", help="sizes to evaluate (names or LxD, comma-separated; default: all of each model's)")
    p.add_argument("--collections", nargs="*", default=[], help="local tasks: BEIR folders or irds:<id> (NAME=SOURCE)")
    p.add_argument("--tasks", nargs="*", default=[], help="MTEB tasks by name (NFCorpus, SciFact, ...): need internet")
    p.add_argument("--split", default=DEFAULT_SPLIT, help="the local collections' qrels split (default: test)")
    p.add_argument("--cache", help="MTEB's result cache folder (default: MTEB's, ~/.cache/mteb or $MTEB_CACHE)")
    p.add_argument("--name", help="ORG/NAME the results are filed under, per size ORG/NAME-SIZE (default: local/<run>)")
    p.add_argument("--overwrite", default="only-missing", choices=["only-missing", "always", "never", "only-cache"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    scores = run_mteb(
        args.models,
        args.collections,
        args.tasks,
        args.sizes,
        args.split,
        args.cache,
        args.name,
        args.batch_size,
        args.device,
        args.overwrite,
    )
    print(scores_table(scores))
    return scores


if __name__ == "__main__":
    main()
