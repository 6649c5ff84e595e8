"""Every user of the ranking loop on one tiny model and collection, its outputs saved for a byte-for-byte
comparison of two versions of the code (not a pytest module: run it before and after a change).

    .venv/bin/python tests/ranking_parity.py /tmp/before
    .venv/bin/python tests/ranking_parity.py /tmp/after
    diff <(cd /tmp/before && sha256sum $(find . -type f | sort)) <(cd /tmp/after && sha256sum $(find . -type f | sort))

It runs `python -m eval.suite` (two models, with and without BEIR's identical-id rule), the encode and
search stages (shards of 64 passages), `python -m train.mine` (dense, two sizes, blocks of 64) and
`train.validation.Validator` (the whole corpus and pooled candidates; the run of every size is captured
where it is evaluated), all on the CPU in a fixed work directory (records hold absolute paths), and
copies each run file, run record, training-group file and validation ranking to OUT.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from conftest import REPO, mini_slice, tiny_bert  # noqa: E402

WORK = Path("/tmp/ranking-parity-work")
SIZES = [
    {"name": "demi", "layers": 1, "dim": 8},
    {"name": "2x16", "layers": 2, "dim": 16},
    {"name": "full", "layers": 4, "dim": 32},
]


def python(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def models(root: Path) -> dict[str, Path]:
    """Two tiny random BERTs with MiniLM's tokenizer saved as Starbucks checkpoints (through `StarbucksModel`
    only, so the script runs on any version of the library's modules)."""
    from retrieval import StarbucksModel

    tokenizer = StarbucksModel.from_pretrained(
        "sentence-transformers/all-MiniLM-L6-v2", "cpu", pooling="mean"
    ).tokenizer
    out = {}
    for name, seed, pooling, normalize in [("a", 0, "mean", False), ("b", 1, "cls", True)]:
        plain = root / f"plain-{name}"
        tiny_bert(layers=4, hidden=32, vocab=tokenizer.vocab_size, seed=seed).save_pretrained(plain)
        tokenizer.save_pretrained(plain)
        out[name] = root / name / "model"
        StarbucksModel.from_pretrained(
            plain, "cpu", pooling=pooling, normalize=normalize, sizes=SIZES, query_max_length=16, passage_max_length=48
        ).save(out[name])
    return out


def config(root: Path, name: str, col: Path, model: Path, **sections) -> Path:
    data = {
        "name": name,
        "output_dir": str(root / name),
        "model": {
            "name_or_path": str(model),
            "pooling": "mean",
            "normalize": False,
            "query_max_length": 16,
            "passage_max_length": 48,
        },
        "sizes": SIZES,
        "data": {"corpus": str(col), "train": str(col / "train.jsonl"), "eval_splits": {"dev": str(col)}},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def suite(root: Path, col: Path, model_dirs: dict, out: Path) -> None:
    for name, extra in [("suite", []), ("suite-ignore-identical", ["--ignore-identical-ids"])]:
        python(
            "-m",
            "eval.suite",
            "--models",
            *(f"{m}={p}" for m, p in model_dirs.items()),
            "--collections",
            f"col={col}",
            "--split",
            "dev",
            "--sizes",
            "demi,2x16,full",
            "--metrics",
            "nDCG@10",
            "RR@10",
            "--depth",
            "20",
            "--out",
            str(root / name),
            "--device",
            "cpu",
            "--batch-size",
            "16",
            *extra,
        )
        for path in sorted((root / name).rglob("runs/dev/*")):
            copy(path, out / name / path.relative_to(root / name))
        copy(root / name / "suite.json", out / name / "suite.json")


def stages(root: Path, col: Path, model: Path, out: Path) -> None:
    from encode.pipeline import encode_collection
    from retrieval.config import load_config
    from search.pipeline import search_collection

    cfg = load_config(
        config(
            root,
            "stages",
            col,
            model,
            encode={"model": str(model), "batch_size": 16, "shard_rows": 64, "splits": "dev"},
            search={"depth": 20, "index": "Flat"},
        )
    )
    encode_collection(cfg, progress=False)
    search_collection(cfg, progress=False)
    for path in sorted((root / "stages" / "runs").rglob("*")):
        if path.is_file():
            copy(path, out / "stages" / path.relative_to(root / "stages" / "runs"))


def mining(root: Path, col: Path, model: Path, out: Path) -> None:
    cfg = config(root, "mine", col, model)
    for size in ("demi", "full"):
        groups = root / f"mined-{size}.jsonl"
        python(
            "-m",
            "train.mine",
            "--config",
            str(cfg),
            "--split",
            "dev",
            "--retriever",
            str(model),
            "--size",
            size,
            "--depth",
            "30",
            "--negatives",
            "5",
            "--skip-top",
            "1",
            "--shard-rows",
            "64",
            "--batch-size",
            "16",
            "--out",
            str(groups),
            "--device",
            "cpu",
            "--no-progress",
        )
        copy(groups, out / "mine" / groups.name)


def validation(root: Path, col: Path, model: Path, out: Path) -> None:
    import train.validation as validation
    from retrieval.config import load_config
    from retrieval.checkpoint import load_encoder
    from retrieval.sizes import SizeList

    encoder, tokenizer, _ = load_encoder(str(model))
    sizes = SizeList.from_config(SIZES)
    evaluate = validation.evaluate
    for candidates in ("corpus", 40):
        cfg = load_config(
            config(
                root,
                f"validation-{candidates}",
                col,
                model,
                train={
                    "eval_split": "dev",
                    "eval_on_reported_split": True,
                    "eval_candidates": candidates,
                    "eval_queries": None,
                },
            )
        )
        runs = []

        def capture(run, *args, **kwargs):
            runs.append(run)
            return evaluate(run, *args, **kwargs)

        validation.evaluate = capture
        try:
            record = validation.Validator(cfg, sizes, tokenizer, seed=1)(encoder)
        finally:
            validation.evaluate = evaluate
        target = out / "validation" / f"{candidates}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            json.dumps(
                {
                    "record": record,
                    "runs": [{q: [[d, repr(s)] for d, s in r.items()] for q, r in run.items()} for run in runs],
                },
                indent=1,
            )
            + "\n"
        )


def main(out: str) -> None:
    out = Path(out)
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    col, _, _ = mini_slice(WORK / "col", queries=20, passages=300)
    model_dirs = models(WORK)
    suite(WORK, col, model_dirs, out)
    stages(WORK, col, model_dirs["a"], out)
    mining(WORK, col, model_dirs["a"], out)
    validation(WORK, col, model_dirs["a"], out)
    print(f"ranking parity: outputs in {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
