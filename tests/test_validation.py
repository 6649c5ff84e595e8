"""Validation during training (`train.eval_steps`): the logged numbers against a brute-force
evaluation of each checkpoint, pooled candidates, the kept best model, early stopping, resume,
and the TensorBoard tracker's event file."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file

from conftest import die_after_checkpoint
from retrieval.config import load_config
from retrieval.errors import StarbucksError
from retrieval.checkpoint import load_encoder, read_meta
from retrieval.sizes import SizeList
from test_train import TINY_SIZES, collection, log_lines, tiny_model, train, write_config  # noqa: F401  (fixtures)
from train.validation import Validator

DEV = 10  # dev queries: the first words of passages d20..d29


@pytest.fixture(scope="module")
def dev_collection(collection):  # noqa: F811
    """The synthetic collection of test_train plus a dev split whose positives are not training positives."""
    corpus = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (collection / "corpus.jsonl").open()}
    with open(collection / "queries.jsonl", "w") as f:
        for i in range(20, 20 + DEV):
            f.write(json.dumps({"_id": f"dev{i}", "text": " ".join(corpus[f"d{i}"].split()[:4])}) + "\n")
    (collection / "qrels").mkdir(exist_ok=True)
    (collection / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"dev{i}\td{i}\t1\n" for i in range(20, 20 + DEV))
    )
    return collection


def run_config(tmp_path, model, data, name="run", **train_settings):
    """Validation at every step over the whole corpus; mean pooling (a random tiny BERT's CLS vectors
    are nearly all the same: their scores tie to the last digits)."""
    settings = {
        **dict(
            max_steps=4,
            eval_steps=1,
            eval_queries=None,
            eval_candidates="corpus",
            save_steps=1,
            save_total_limit=0,
            learning_rate=3e-3,
        ),
        **train_settings,
    }
    config = write_config(tmp_path, model, data, name=name, **settings)
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["pooling"] = "mean"
    config.write_text(yaml.safe_dump(cfg))
    return config


def train_with_dev(config, data, *overrides):
    """Validation on the dev split, which the eval stage also reports: allowed only when said (the
    machinery is the same for the held-back split, `test_heldout_training_queries_...`)."""
    return train(
        config, f"data.eval_splits.dev={data}", "train.eval_split=dev", "train.eval_on_reported_split=true", *overrides
    )


def eval_lines(run_dir: Path) -> list[dict]:
    return [r for r in log_lines(run_dir) if "eval/avg/RR@10" in r]


def brute_force_rr10(model_dir: Path, data: Path, min_gap: float = 1e-5) -> dict[str, float]:
    """RR@10 per size of a checkpoint: each text embedded alone, every passage scored, ranks by hand.
    Every relevant passage's score is at least `min_gap` from any other (batching's float noise is ~1e-7:
    it cannot reorder them)."""
    encoder, tokenizer, meta = load_encoder(str(model_dir))
    encoder.eval()
    sizes = SizeList.from_config(meta["sizes"])
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    queries = [json.loads(line) for line in (data / "queries.jsonl").open()]
    relevant = {
        line.split("\t")[0]: line.split("\t")[1] for line in (data / "qrels" / "dev.tsv").read_text().splitlines()[1:]
    }

    def embed(text, max_length):
        batch = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            return encoder(dict(batch), sizes)

    p = [embed(d["text"], meta["passage_max_length"]) for d in corpus]
    out = {}
    for size in sizes:
        passages = torch.cat([e[size] for e in p])
        reciprocal = []
        for q in queries:
            scores = (passages @ embed(q["text"], meta["query_max_length"])[size].T).squeeze(1)
            ranking = [corpus[i]["_id"] for i in torch.argsort(scores, descending=True).tolist()]
            rank = ranking.index(relevant[q["_id"]]) + 1
            gaps = (scores - scores[int(relevant[q["_id"]][1:])]).abs()
            assert sorted(gaps.tolist())[1] > min_gap, (q["_id"], size)  # [0] is the passage itself
            reciprocal.append(1 / rank if rank <= 10 else 0.0)
        out[size.name] = sum(reciprocal) / len(reciprocal)
    return out


def test_validation_equals_a_brute_force_evaluation_of_each_checkpoint(tmp_path, tiny_model, dev_collection):
    train_with_dev(run_config(tmp_path, tiny_model, dev_collection, max_steps=2), dev_collection)
    lines = eval_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2]
    for record in lines:
        expected = brute_force_rr10(
            tmp_path / "run" / "checkpoints" / f"checkpoint-{record['step']}" / "model", dev_collection
        )
        for name, value in expected.items():
            assert record[f"eval/{name}/RR@10"] == pytest.approx(value, abs=1e-9), (record["step"], name)
        assert record["eval/avg/RR@10"] == pytest.approx(sum(expected.values()) / len(expected))


def test_pooled_candidates(tmp_path, tiny_model, dev_collection):
    cfg = load_config(
        write_config(tmp_path, tiny_model, dev_collection),
        [
            f"data.eval_splits.dev={dev_collection}",
            "train.eval_split=dev",
            "train.eval_on_reported_split=true",
            "train.eval_candidates=10",
            "train.eval_queries=6",
        ],
    )
    encoder, tokenizer, _ = load_encoder(str(tiny_model), "mean", False)  # CLS scores tie (see run_config)
    sizes = SizeList.from_config(TINY_SIZES)
    pooled = Validator(cfg, sizes, tokenizer, seed=1)
    assert len(pooled.split.queries) == 6
    assert pooled.pools == Validator(cfg, sizes, tokenizer, seed=1).pools  # seeded
    for qid, pool in zip(pooled.split.queries, pooled.pools):
        assert len(pool) == len(set(pool)) == 10 and set(pooled.split.qrels[qid]) <= set(pool)
    # a pool as large as the corpus ranks what the full corpus does
    cfg.train.eval_candidates = 80
    everything = Validator(cfg, sizes, tokenizer, seed=1)
    assert all(len(p) == 80 for p in everything.pools)
    cfg.train.eval_candidates = "corpus"
    corpus = Validator(cfg, sizes, tokenizer, seed=1)
    assert corpus.pools is None and len(corpus.passages) == 80
    assert everything(encoder) == pytest.approx(corpus(encoder), abs=1e-12)


def first_non_improving(values: list[float], patience: int = 1) -> int | None:
    """1-based index of the validation where `patience` validations in a row set no new best."""
    best, since = None, 0
    for i, v in enumerate(values, 1):
        if best is None or v > best:
            best, since = v, 0
        else:
            since += 1
            if since >= patience:
                return i
    return None


def weights(model_dir: Path) -> dict:
    return load_file(model_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path):
    a, b = weights(a), weights(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # four short trainings
def test_keep_best_early_stopping_and_resume(tmp_path, tiny_model, dev_collection, monkeypatch):
    # no early stopping: every step validated, the final model is the best logged checkpoint
    full = train_with_dev(
        run_config(tmp_path, tiny_model, dev_collection, name="full", max_steps=6, keep_best="avg"), dev_collection
    )
    scores = [r["eval/avg/RR@10"] for r in eval_lines(tmp_path / "full")]
    best_step = scores.index(max(scores)) + 1
    assert full.best.step == best_step and full.best.score == max(scores)
    assert read_meta(tmp_path / "full" / "model")["step"] == best_step
    assert_same_weights(
        tmp_path / "full" / "model", tmp_path / "full" / "checkpoints" / f"checkpoint-{best_step}" / "model"
    )

    # patience 1: stops at the first validation without a new best (the same scores: same seed and data)
    stop = first_non_improving(scores)
    assert stop is not None and stop < 6, scores  # the setting must exercise early stopping
    settings = dict(max_steps=6, keep_best="avg", early_stopping_patience=1)
    stopped = train_with_dev(run_config(tmp_path, tiny_model, dev_collection, name="es", **settings), dev_collection)
    assert stopped.steps == stop and stopped.best.stopped
    assert [r["step"] for r in eval_lines(tmp_path / "es")] == list(range(1, stop + 1))
    es_best = stopped.best.step
    assert_same_weights(
        tmp_path / "es" / "model", tmp_path / "full" / "checkpoints" / f"checkpoint-{es_best}" / "model"
    )

    # killed after the checkpoint of step 1, resumed: the same best, the same stop, the same model
    config = run_config(tmp_path, tiny_model, dev_collection, name="killed", **settings)
    die_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_with_dev(config, dev_collection)
    monkeypatch.undo()
    state = json.loads((tmp_path / "killed" / "checkpoints" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["best"]["step"] == 1 and state["best"]["score"] == scores[0]
    resumed = train_with_dev(config, dev_collection)
    assert (resumed.start_step, resumed.steps, resumed.best.step, resumed.best.score) == (
        1,
        stop,
        es_best,
        stopped.best.score,
    )
    assert_same_weights(tmp_path / "killed" / "model", tmp_path / "es" / "model")
    again = train_with_dev(config, dev_collection)  # a run that stopped early stays stopped
    assert again.start_step == again.steps == stop


def test_tensorboard_event_file_holds_the_per_size_terms(tmp_path, tiny_model, dev_collection):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_with_dev(
        run_config(tmp_path, tiny_model, dev_collection, max_steps=2, report_to="tensorboard"), dev_collection
    )
    (events,) = (tmp_path / "run" / "logs" / "srl").glob("events.out.tfevents.*")
    reader = EventAccumulator(str(events))
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    for size in TINY_SIZES:
        assert {f"ce/{size}", f"eval/{size}/RR@10"} <= tags
    assert {"kl/1x8", "kl/2x16", "loss", "lr", "grad_norm", "queries_per_s", "eval/avg/RR@10"} <= tags
    logged = {r["step"]: r for r in log_lines(tmp_path / "run") if "loss" in r}
    for tag in ("loss", "ce/1x8", "kl/2x16", "lr"):
        events = reader.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([logged[1][tag], logged[2][tag]], rel=1e-6)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.keep_best=avg"], "train.keep_best needs validation during training"),
        (["train.eval_steps=1", "train.keep_best=huge"], "train.keep_best = 'huge' is not avg or one of the sizes"),
        (
            ["train.eval_steps=1", "train.eval_split=nope"],
            "train.eval_split = 'nope' is neither heldout nor in data.eval",
        ),
        (
            ["train.eval_steps=1", "train.eval_on_reported_split=false"],
            "train.eval_split = 'dev' is a split the eval stage reports .* selects on the test data",
        ),
        (
            ["train.eval_steps=1", "train.eval_split=heldout"],
            "needs training queries held back for it: set train.holdout",
        ),
        (["train.holdout_queries=20"], "leaves nothing to train on"),
        (["train.eval_steps=1", "train.eval_metric=RR@ten"], "unknown metric"),
        (["train.report_to=nosuch"], "'nosuch' is not one of none"),
        (["train.report_to=wandb"], "pip install wandb"),
    ],
)
def test_validation_and_tracker_misconfigurations(tmp_path, tiny_model, dev_collection, overrides, message):
    if overrides == ["train.report_to=wandb"] and importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(StarbucksError, match=message):
        train_with_dev(write_config(tmp_path, tiny_model, dev_collection), dev_collection, *overrides)


def test_heldout_training_queries_are_not_trained_on_and_validate_like_brute_force(
    tmp_path, tiny_model, collection, monkeypatch
):  # noqa: F811
    import train.finetune as finetune

    trained = []

    class Recording(finetune.GroupDataset):
        def __init__(self, groups, *args):
            trained.extend(g.query_id for g in groups)
            super().__init__(groups, *args)

    monkeypatch.setattr(finetune, "GroupDataset", Recording)
    config = run_config(tmp_path, tiny_model, collection, max_steps=2, eval_split="heldout", holdout_queries=6)
    train(config)
    everything = [json.loads(line) for line in (collection / "train.jsonl").open()]
    heldout = [g for g in everything if g["query_id"] not in trained]
    assert len(trained) == 14 and len(heldout) == 6  # 20 groups: 6 held back, never in a batch
    # the held-back queries' split, written out for the brute-force evaluation: their positives in the training corpus
    split = tmp_path / "heldout"
    (split / "qrels").mkdir(parents=True)
    (split / "corpus.jsonl").write_text((collection / "corpus.jsonl").read_text())
    (split / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": g["query_id"], "text": g["query"]}) + "\n" for g in heldout)
    )
    (split / "qrels" / "dev.tsv").write_text(
        "query-id\tcorpus-id\tscore\n"
        + "".join(f"{g['query_id']}\t{g['positive_document_ids'][0]}\t1\n" for g in heldout)
    )
    lines = eval_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2]
    for record in lines:
        expected = brute_force_rr10(
            tmp_path / "run" / "checkpoints" / f"checkpoint-{record['step']}" / "model", split, min_gap=1e-6
        )  # 3-word queries: closer scores, still 10x the noise
        for name, value in expected.items():
            assert record[f"eval/{name}/RR@10"] == pytest.approx(value, abs=1e-9), (record["step"], name)
    # the same queries are held back whatever the seed: runs of one comparison validate alike
    trained.clear()
    train(
        run_config(
            tmp_path, tiny_model, collection, name="seed7", max_steps=1, eval_split="heldout", holdout_queries=6
        ),
        "seed=7",
    )
    assert sorted(q for q in (g["query_id"] for g in everything) if q not in trained) == sorted(
        g["query_id"] for g in heldout
    )
