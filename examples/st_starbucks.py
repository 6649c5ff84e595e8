"""Train a Starbucks model in a plain sentence-transformers script (the paper's STS path) and report
the Spearman correlation of every size with ST's `EmbeddingSimilarityEvaluator`, before and after.

    # offline, on the CPU: MiniLM on the debian-pkgs pairs shipped in examples/data (docs/sentence-transformers.md)
    python examples/st_starbucks.py

    # the paper's STS setting (Table 5), with internet and a GPU: BERT-base on AllNLI triplets, STS-B test
    python examples/st_starbucks.py --model bert-base-uncased --pooling mean \
        --train hf:sentence-transformers/all-nli:triplet --eval hf:sentence-transformers/stsb:test \
        --sizes 2x32,4x64,6x128,8x256,10x512,12x768 --batch-size 128 --epochs 1 --lr 5e-5

    # the low-resource setting: train on STS-B's train split with CoSENT
    python examples/st_starbucks.py --model bert-base-uncased --pooling mean --loss cosent \
        --train hf:sentence-transformers/stsb:train --eval hf:sentence-transformers/stsb:test \
        --sizes 2x32,4x64,6x128,8x256,10x512,12x768 --epochs 4

The trained model is saved with `save_for_starbucks`, so this toolkit loads it at every size:
`StarbucksModel.from_pretrained("runs/st-starbucks/model").encode(texts, size="2x32")`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.config import DEFAULTS  # noqa: E402
from retrieval.checkpoint import resolve_model_path  # noqa: E402
from retrieval.sizes import SizeList  # noqa: E402
from retrieval.st_loss import StarbucksSTLoss, as_sizes, at_size, save_for_starbucks  # noqa: E402

DATA = ROOT / "examples" / "data"
LOSSES = ("mnrl", "cached-mnrl", "cosent")


def load_rows(source: str):
    """`hf:<dataset id>[:<config>]:<split>` ... or a local JSONL[.gz] file, as a `datasets.Dataset`."""
    from datasets import load_dataset

    if source.startswith("hf:"):
        name, *rest = source[3:].split(":")
        config, split = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0] if rest else "train")
        return load_dataset(name, config, split=split)
    return load_dataset("json", data_files=source, split="train")


def spearman_per_size(model, pairs, sizes) -> dict[str, float]:
    """Spearman correlation (cosine) of each size on the scored pairs (`sentence1`, `sentence2`, `score`)."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator, SimilarityFunction

    out = {}
    for size in sizes:
        evaluator = EmbeddingSimilarityEvaluator(
            pairs["sentence1"],
            pairs["sentence2"],
            pairs["score"],
            main_similarity=SimilarityFunction.COSINE,
            name=size.key,
        )
        with at_size(model, size):
            out[size.key] = evaluator(model)[f"{size.key}_spearman_cosine"]
    return out


def build_model(name: str, pooling: str | None, max_seq_length: int):
    """A SentenceTransformer: the model's own modules when it has them, else Transformer + `pooling`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    path = resolve_model_path(name)
    if pooling is None:
        model = SentenceTransformer(path)
    else:
        transformer = Transformer(path)
        model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling)])
    model.max_seq_length = max_seq_length
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument(
        "--pooling",
        default=None,
        choices=["mean", "cls"],
        help="for a plain HF model (default: the model's own sentence-transformers modules)",
    )
    parser.add_argument(
        "--train",
        default=str(DATA / "debian-pairs-train.jsonl.gz"),
        help="local JSONL[.gz] or hf:<id>[:<config>]:<split> (columns: anchor, positive[, negative] "
        "for mnrl; sentence1, sentence2, score for cosent)",
    )
    parser.add_argument(
        "--eval",
        default=str(DATA / "debian-pairs-eval.jsonl.gz"),
        help="scored pairs (sentence1, sentence2, score), local or hf:...",
    )
    parser.add_argument(
        "--sizes",
        default=",".join(f"{s['layers']}x{s['dim']}" for s in DEFAULTS["sizes"]),
        help="LAYERSxDIM list, small to large (default: MiniLM's six sizes)",
    )
    parser.add_argument("--loss", default="mnrl", choices=LOSSES)
    parser.add_argument("--mini-batch-size", type=int, default=32, help="cached-mnrl: GradCache mini-batch")
    parser.add_argument("--method", default="srl", choices=["srl", "2dmse"])
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--kl-temperature", type=float, default=0.3)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--out", default="runs/st-starbucks")
    args = parser.parse_args(argv)

    import torch
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer import losses

    sizes: SizeList = as_sizes(args.sizes.split(","))
    model = build_model(args.model, args.pooling, args.max_seq_length)
    base = {
        "mnrl": lambda: losses.MultipleNegativesRankingLoss(model),
        "cached-mnrl": lambda: losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size),
        "cosent": lambda: losses.CoSENTLoss(model),
    }[args.loss]()
    loss = StarbucksSTLoss(
        model, base, sizes=sizes, kl_weight=args.kl_weight, kl_temperature=args.kl_temperature, method=args.method
    )
    train, pairs = load_rows(args.train), load_rows(args.eval)
    print(
        f"{args.model}: {len(train)} training rows, {len(pairs)} scored pairs, sizes {args.sizes}, "
        f"{args.loss} + StarbucksSTLoss ({args.method})"
    )

    before = spearman_per_size(model, pairs, sizes)
    cuda = torch.cuda.is_available()
    training = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.out) / "checkpoints"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=0.1,
        seed=42,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        save_strategy="no",
        logging_steps=10,
        report_to="none",
        batch_sampler=BatchSamplers.NO_DUPLICATES if args.loss != "cosent" else BatchSamplers.BATCH_SAMPLER,
    )
    SentenceTransformerTrainer(model=model, args=training, train_dataset=train, loss=loss).train()
    after = spearman_per_size(model, pairs, sizes)

    print("\n| size | Spearman before | Spearman after |\n|---|---|---|")
    for size in sizes:
        print(f"| {size.key} | {before[size.key]:.4f} | {after[size.key]:.4f} |")
    directory = save_for_starbucks(model, Path(args.out) / "model", sizes, method=args.method)
    from retrieval import StarbucksModel

    loaded = StarbucksModel.from_pretrained(directory)
    dims = [loaded.encode(pairs["sentence1"][:1], size=size.key).shape[1] for size in sizes]
    print(
        f"\nsaved {directory}; this toolkit encodes it at every size ({', '.join(map(str, dims))} dims): "
        f"StarbucksModel.from_pretrained({str(directory)!r}).encode(texts, size='LxD')"
    )


if __name__ == "__main__":
    main()
