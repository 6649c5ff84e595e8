"""`python -m train`: methods, bad configs, checkpoints and exact resume, short real runs."""

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import REPO, assert_all_near, die_after_checkpoint, tiny_bert
from retrieval.config import load_config
from retrieval.cost import read_train_summary
from retrieval.errors import StarbucksError
from retrieval.checkpoint import load_encoder, read_meta, resolve_model_path
from retrieval.encoder import StarbucksEncoder
from retrieval.sizes import Size, SizeList
from train.__main__ import main
from train.checkpoint import Checkpoints
from train.finetune import run_training
from retrieval.samplers import TwoDMSESizes
from train.methods import plan_method

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MINI = REPO / "data" / "debian-pkgs-mini"
TINY_SIZES = ["1x8", "2x16", "4x32"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random 4-layer, 32-dim BERT with MiniLM's tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert(layers=4, hidden=32, vocab=30522, seed=0).save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """A synthetic BEIR collection: 20 ids-only training groups with 6 hard negatives each."""
    d = tmp_path_factory.mktemp("synthetic")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)) for _ in range(200)]
    docs = {f"d{i}": " ".join(rng.sample(words, 12)) for i in range(80)}
    with open(d / "corpus.jsonl", "w") as f:
        for i, text in docs.items():
            f.write(json.dumps({"_id": i, "text": text}) + "\n")
    with open(d / "train.jsonl", "w") as f:
        for g in range(20):
            pos = f"d{g}"
            negs = rng.sample([i for i in docs if i != pos], 6)
            query = " ".join(docs[pos].split()[:3])
            f.write(
                json.dumps(
                    {"query_id": f"q{g}", "query": query, "positive_document_ids": [pos], "negative_document_ids": negs}
                )
                + "\n"
            )
    return d


def write_config(
    tmp_path: Path, model, data: Path, train_file: str = "train.jsonl", name="run", sizes=None, **train
) -> Path:
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / name),
        "model": {
            "name_or_path": str(model),
            "pooling": "cls",
            "normalize": False,
            "query_max_length": 16,
            "passage_max_length": 32,
        },
        "sizes": sizes or TINY_SIZES,
        "data": {"corpus": str(data), "train": str(data / train_file)},
        "train": {
            "batch_size": 4,
            "group_size": 3,
            "learning_rate": 1e-3,
            "max_steps": 2,
            "save_steps": 100,
            "logging_steps": 1,
            "temperature": 1.0,
            **train,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, *overrides):
    return run_training(load_config(config, overrides))


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def record_layers(monkeypatch) -> list:
    """Record the layer sets the encoder is asked for (padded or packed batches)."""
    import retrieval.encoder

    calls = []
    original, packed = StarbucksEncoder.hidden_states, retrieval.encoder.packed_hidden_states

    def spy(self, batch, layers):
        calls.append(sorted(set(layers)))
        return original(self, batch, layers)

    def packed_spy(backbone, layers, batch, wanted, *args, **kwargs):
        calls.append(sorted(set(wanted)))
        return packed(backbone, layers, batch, wanted, *args, **kwargs)

    monkeypatch.setattr(StarbucksEncoder, "hidden_states", spy)
    monkeypatch.setattr(retrieval.encoder, "packed_hidden_states", packed_spy)
    return calls


# ---------------------------------------------------------------- methods


def test_2dmse_list_samples_stay_in_range_and_visit_every_layer():
    sizes = SizeList.from_config(["1x32", "2x64", "3x96", "4x128", "5x256", "6x384"])
    schedule = TwoDMSESizes(sizes, seed=7, dims="list")
    layers_seen, dims_seen = set(), set()
    for step in range(400):
        visited = schedule.at(step)
        (n, d), (n2, big_d), (big_n, d2), full = [(s.layers, s.dim) for s in visited]
        assert 1 <= n <= 5 and d in {32, 64, 96, 128, 256}
        assert (n2, big_d, big_n, d2) == (n, 384, 6, d) and full == (6, 384)
        assert visited[3] is sizes.largest  # configured names are kept
        layers_seen.add(n)
        dims_seen.add(d)
        assert schedule.at(step) == visited  # a pure function of (seed, step): same on every rank and resume
    assert layers_seen == {1, 2, 3, 4, 5}
    assert dims_seen == {32, 64, 96, 128, 256}


def test_2dmse_uniform_sampler_covers_every_layer_and_dim_below_the_largest():
    # the paper's Eq. 3: n ~ U(1, N-1), d ~ U(1, D-1); the default of train.twodmse_dims
    sizes = SizeList.from_config(["1x4", "2x8", "3x16", "4x24"])
    assert load_config(None, []).train.twodmse_dims == "uniform"
    schedule = plan_method(load_config(None, ["train.method=2dmse"]).train, sizes, 4, 24, seed=3).schedule
    draws = [schedule.at(step) for step in range(3000)]
    pairs = [(v[0].layers, v[0].dim) for v in draws]
    assert {n for n, _ in pairs} == {1, 2, 3} and {d for _, d in pairs} == set(range(1, 24))
    counts = [sum(d == k for _, d in pairs) for k in range(1, 24)]
    assert min(counts) > 3000 / 23 / 2  # roughly uniform, not merely covered
    assert all([(s.layers, s.dim) for s in v[1:]] == [(n, 24), (4, d), (4, 24)] for v, (n, d) in zip(draws, pairs))
    # resume: a new sampler (as a resumed run builds) draws the same sizes from any step on
    again = TwoDMSESizes(sizes, seed=3)
    assert [again.at(step) for step in range(1500, 3000)] == draws[1500:]
    assert [TwoDMSESizes(sizes, seed=4).at(step) for step in range(50)] != draws[:50]
    with pytest.raises(StarbucksError, match="twodmse_dims = 'grid' is not one of uniform, list"):
        TwoDMSESizes(sizes, seed=3, dims="grid")


def test_method_plans():
    sizes = SizeList.from_config(TINY_SIZES)
    full = plan_method(load_config(None, ["train.method=full"]).train, sizes, 4, 32, seed=0)
    assert [(s.layers, s.dim) for s in full.schedule.at(3)] == [(4, 32)] and full.truncate_to is None
    sep = plan_method(load_config(None, ["train.method=separate", "train.size=2x16"]).train, sizes, 4, 32, seed=0)
    assert sep.schedule.at(0) == [sizes.get("2x16")] and sep.truncate_to == 2
    assert list(sep.saved_sizes) == [sizes.get("2x16")]
    srl = plan_method(load_config(None, []).train, SizeList.from_config(["1x8", "2x16"]), 4, 32, seed=0)
    assert srl.truncate_to == 2  # layers above the deepest size are never trained


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.method=separate"], "set train.size"),
        (["train.method=2dmse", "train.size_weights=[1,1,1]"], "size_weights applies to method srl"),
        (["train.size=2x16"], "train.size is for method separate"),
    ],
)
def test_method_misconfigurations(overrides, message):
    with pytest.raises(StarbucksError, match=message):
        plan_method(load_config(None, overrides).train, SizeList.from_config(TINY_SIZES), 4, 32, seed=0)


# ---------------------------------------------------------------- bad configs fail first, in one line


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.method=bogus"], "train.method = 'bogus' is not one of srl, 2dmse, separate, full"),
        (["sizes=[1x8,8x32]"], "asks for 8 layers but"),
        (["sizes=[1x8,4x64]"], "asks for 64 dims but"),
        (["train.group_size=0"], "train.group_size = 0 must be a whole number >= 1"),
        (["train.precision=fp16"], "fp16 needs a GPU"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, tiny_model, collection, capsys, overrides, message):
    config = write_config(tmp_path, tiny_model, collection)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- what the methods train


def test_srl_run_writes_a_self_describing_model(tmp_path, tiny_model, collection, monkeypatch):
    calls = record_layers(monkeypatch)
    result = train(write_config(tmp_path, tiny_model, collection))
    assert calls and all(c == [1, 2, 4] for c in calls)  # one pass per batch, to the deepest size
    model_dir = tmp_path / "run" / "model"
    assert result.model_dir == model_dir and result.steps == 2
    meta = read_meta(model_dir)
    assert [s["name"] for s in meta["sizes"]] == TINY_SIZES
    assert (meta["method"], meta["pooling"], meta["normalize"]) == ("srl", "cls", False)
    assert (meta["query_max_length"], meta["passage_max_length"], meta["query_prefix"]) == (16, 32, "")
    assert meta["base_model"] == str(tiny_model) and meta["config"]["train"]["group_size"] == 3
    assert meta["step"] == 2
    encoder, _, _ = load_encoder(str(model_dir))
    assert (encoder.pooling, encoder.num_layers) == ("cls", 4)
    lines = log_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2]
    assert {"loss", "lr", "queries_per_s", "ce/1x8", "ce/2x16", "ce/4x32", "kl/1x8", "kl/2x16"} <= set(lines[0])
    assert "kl/4x32" not in lines[0]


def test_separate_trains_a_model_of_exactly_n_layers(tmp_path, tiny_model, collection, monkeypatch):
    from transformers import AutoModel

    calls = record_layers(monkeypatch)
    train(write_config(tmp_path, tiny_model, collection, method="separate", size="2x16"))
    assert calls and all(c == [2] for c in calls)
    model_dir = tmp_path / "run" / "model"
    assert AutoModel.from_pretrained(model_dir).config.num_hidden_layers == 2
    meta = read_meta(model_dir)
    assert meta["sizes"] == [{"name": "2x16", "layers": 2, "dim": 16}] and meta["method"] == "separate"
    encoder, tokenizer, _ = load_encoder(str(model_dir))
    assert encoder.num_layers == 2
    batch = tokenizer(["a query"], return_tensors="pt")
    (emb,) = encoder.embed(batch, [Size("", 2, 16)]).values()
    assert emb.shape == (1, 16)
    with pytest.raises(StarbucksError, match="asks for 4 layers"):
        encoder.embed(batch, [Size("", 4, 32)])


def test_full_uses_only_the_last_layer(tmp_path, tiny_model, collection, monkeypatch):
    calls = record_layers(monkeypatch)
    train(write_config(tmp_path, tiny_model, collection, method="full"))
    assert calls and all(c == [4] for c in calls)
    assert {k for k in log_lines(tmp_path / "run")[0] if k.startswith(("ce/", "kl/"))} == {"ce/4x32"}
    assert [s["name"] for s in read_meta(tmp_path / "run" / "model")["sizes"]] == TINY_SIZES


def test_2dmse_run_logs_the_four_sampled_sizes(tmp_path, tiny_model, collection):
    train(write_config(tmp_path, tiny_model, collection, method="2dmse", max_steps=1))
    (line,) = log_lines(tmp_path / "run")
    assert len([k for k in line if k.startswith("ce/")]) == 4 and "ce/4x32" in line
    assert len([k for k in line if k.startswith("kl/")]) == 3


def test_gradient_checkpointing_gives_the_same_run(tmp_path, tiny_model, collection, monkeypatch):
    import transformers.modeling_utils

    checkpointed = []
    original = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(
        transformers.modeling_utils, "checkpoint", lambda *a, **k: checkpointed.append(1) or original(*a, **k)
    )
    train(write_config(tmp_path, tiny_model, collection, name="plain", max_steps=1))
    assert not checkpointed
    train(write_config(tmp_path, tiny_model, collection, name="ckpt", max_steps=1, gradient_checkpointing=True))
    assert len(checkpointed) == 2 * 4  # queries and passages, 4 layers each
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    b = load_file(tmp_path / "ckpt" / "model" / "model.safetensors")
    assert_all_near(b, a, rel=1e-6)


def test_log_averages_each_term_over_the_steps_that_logged_it(tmp_path):
    from types import SimpleNamespace

    from train.trainer import TrainLog

    log = TrainLog(tmp_path / "train_log.jsonl", 0, main=True)
    log.add({"loss": 1.0, "ce/1x8": 0.5})  # 2DMSE: a size that is visited in one step of the window only
    log.add({"loss": 3.0, "ce/2x16": 2.0})
    record = log.flush(SimpleNamespace(device="cpu", num_processes=1), {"step": 2})
    assert (record["loss"], record["ce/1x8"], record["ce/2x16"]) == (2.0, 0.5, 2.0)
    assert log_lines(tmp_path) == [record]


# ---------------------------------------------------------------- checkpoints and resume


def test_checkpoint_directory_ignores_incomplete_ones(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    for step in (2, 4, 6):
        staging = ckpts.staging(step)
        staging.mkdir(parents=True)
        (staging / "trainer_state.json").write_text("{}")
        ckpts.commit(staging, step)
    (tmp_path / "checkpoint-9").mkdir()  # no trainer_state.json: not complete
    ckpts.staging(8).mkdir()
    assert [s for s, _ in ckpts.complete()] == [4, 6]  # keep=2 dropped checkpoint-2
    assert ckpts.latest() == tmp_path / "checkpoint-6"
    ckpts.clear_staging()
    assert not ckpts.staging(8).exists()


@pytest.mark.parametrize("method", ["srl", "2dmse"])
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, tiny_model, collection, monkeypatch, method):
    # 20 groups, batch 4, accumulation 2: 2 steps per epoch; 5 steps cross two epoch boundaries,
    # and the checkpoint at step 3 sits in the middle of an epoch and of a log window (steps 3-4).
    # Dropout is on (tiny BERT: 0.1).
    settings = dict(method=method, max_steps=5, grad_accum=2, save_steps=3, save_total_limit=1, logging_steps=2)
    straight = train(write_config(tmp_path, tiny_model, collection, name="straight", **settings))

    config = write_config(tmp_path, tiny_model, collection, name="killed", **settings)
    die_after_checkpoint(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.undo()
    run = tmp_path / "killed"
    assert not (run / "model").exists() and [s for s, _ in Checkpoints(run / "checkpoints").complete()] == [3]
    (run / "checkpoints" / ".tmp-checkpoint-4" / "state").mkdir(parents=True)  # a half-written checkpoint

    resumed = train(config)
    assert (resumed.start_step, resumed.steps, straight.steps) == (3, 5, 5)
    assert read_meta(run / "model")["step"] == 5
    assert [s for s, _ in Checkpoints(run / "checkpoints").complete()] == [5]
    assert not (run / "checkpoints" / ".tmp-checkpoint-4").exists()
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert_all_near(b, a, rel=1e-6)
    straight_log, resumed_log = log_lines(tmp_path / "straight"), log_lines(run)
    assert [r["step"] for r in resumed_log] == [r["step"] for r in straight_log] == [2, 4, 5]
    # the first log after the restart (step 4) averages steps 3 (before the kill) and 4, as the straight run's
    for key in ("loss", "ce/4x32", "grad_norm"):
        assert resumed_log[1][key] == pytest.approx(straight_log[1][key], rel=1e-6), key
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in straight_log])
    # the cost record adds up the invocations: the same steps and FLOPs as the uninterrupted run
    straight_cost, resumed_cost = read_train_summary(tmp_path / "straight"), read_train_summary(run)
    assert straight_cost["flops"] > 0 and straight_cost["device"] == "cpu" and straight_cost["seconds"] > 0
    assert (resumed_cost["steps"], resumed_cost["flops"]) == (5, straight_cost["flops"])


def test_rerun_of_a_finished_run_and_changed_settings(tmp_path, tiny_model, collection, capsys):
    config = write_config(tmp_path, tiny_model, collection)
    train(config)
    weights = load_file(tmp_path / "run" / "model" / "model.safetensors")
    again = train(config)
    assert again.start_step == again.steps == 2
    assert "already trained" in capsys.readouterr().out
    for k, v in load_file(tmp_path / "run" / "model" / "model.safetensors").items():
        assert torch.equal(v, weights[k])
    with pytest.raises(StarbucksError, match=r"train.learning_rate .*train.resume=false"):
        train(config, "train.learning_rate=0.01")
    fresh = train(config, "train.learning_rate=0.01", "train.resume=false")
    assert fresh.start_step == 0


# ---------------------------------------------------------------- real data


@pytest.mark.skipif(not MINI.is_dir(), reason="data/debian-pkgs-mini not built")
def test_short_run_on_debian_pkgs_mini_lowers_the_loss(tmp_path, tiny_model):
    config = write_config(
        tmp_path,
        tiny_model,
        MINI,
        train_file="train.jsonl.gz",
        batch_size=16,
        group_size=4,
        max_steps=40,
        learning_rate=2e-3,
        warmup_ratio=0.05,
        temperature=0.05,
    )
    train(config, "model.passage_max_length=48", "model.pooling=mean", "model.normalize=true")
    losses = [r["loss"] for r in log_lines(tmp_path / "run")]
    assert len(losses) == 40
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)


@pytest.fixture(scope="module")
def quiet_minilm(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2 without dropout, so that a training step's loss is a function of its batch."""
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("minilm-no-dropout")
    path = resolve_model_path(MINILM)
    AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).save_pretrained(d)
    AutoTokenizer.from_pretrained(path).save_pretrained(d)
    return d


def first_batch(monkeypatch) -> list[dict]:
    """Record the tokenised batches the training collator makes (train.dataloader_workers=0)."""
    from train.data import GroupCollator

    batches = []
    original = GroupCollator.__call__
    monkeypatch.setattr(
        GroupCollator, "__call__", lambda self, items: batches.append(original(self, items)) or batches[-1]
    )
    return batches


def plain_terms(
    backbone: Path, batch: dict, sizes: dict[str, tuple[int, int]], temperature: float, kl_temperature: float = 1.0
) -> dict[str, float]:
    """`ce/<size>` and `kl/<size>` of a step from a plain HF forward: mean-pooled `hidden_states[n]`, its
    first `d` dims, L2-normalised; query i's positive at column i * group; KL(P_largest || P_size)."""
    import torch.nn.functional as F
    from transformers import AutoModel

    model = AutoModel.from_pretrained(backbone).eval()

    def embed(texts):
        with torch.no_grad():
            hidden = model(
                input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], output_hidden_states=True
            ).hidden_states
        mask = texts["attention_mask"].unsqueeze(-1).float()
        return {
            name: F.normalize(((hidden[n] * mask).sum(1) / mask.sum(1))[:, :d], dim=-1)
            for name, (n, d) in sizes.items()
        }

    q, p = embed(batch["queries"]), embed(batch["passages"])
    logits = {name: q[name] @ p[name].T / temperature for name in sizes}
    group = p[next(iter(sizes))].shape[0] // q[next(iter(sizes))].shape[0]
    target = torch.arange(len(batch["queries"]["input_ids"])) * group
    teacher = max(sizes, key=lambda name: sizes[name])
    terms = {f"ce/{name}": F.cross_entropy(x, target).item() for name, x in logits.items()}
    for name, x in logits.items():
        if name != teacher:
            p_teacher = torch.softmax(logits[teacher] / kl_temperature, -1)
            log_student = torch.log_softmax(x / kl_temperature, -1)
            terms[f"kl/{name}"] = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean().item()
    return terms


def test_minilm_backbone_trains_on_cpu(tmp_path, collection, quiet_minilm, monkeypatch):
    """The first step's loss terms equal a plain HF computation on its batch; the second step trains on."""
    batches = first_batch(monkeypatch)
    config = write_config(
        tmp_path,
        quiet_minilm,
        collection,
        sizes=["1x32", "3x96", "6x384"],
        max_steps=2,
        batch_size=4,
        group_size=2,
        learning_rate=5e-5,
        dataloader_workers=0,
    )
    result = train(config, "model.pooling=mean", "model.normalize=true", "train.temperature=0.05")
    first, second = log_lines(tmp_path / "run")
    sizes = {"1x32": (1, 32), "3x96": (3, 96), "6x384": (6, 384)}
    expected = plain_terms(quiet_minilm, batches[0], sizes, temperature=0.05)
    assert set(expected) == {k for k in first if k.startswith(("ce/", "kl/"))}
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert first["loss"] == pytest.approx(sum(expected.values()) / 3, rel=1e-4)  # the mean of (ce + kl) over sizes
    # linear warm-up starts at learning rate 0: step 2 still sees the initial weights, its update does not
    for key, value in plain_terms(quiet_minilm, batches[1], sizes, temperature=0.05).items():
        assert second[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    before = load_file(quiet_minilm / "model.safetensors")
    after = load_file(tmp_path / "run" / "model" / "model.safetensors")
    changed = [k for k in after if k in before and not torch.equal(after[k], before[k])]
    assert result.steps == 2 and changed
    meta = read_meta(tmp_path / "run" / "model")
    assert (meta["pooling"], meta["normalize"], meta["base_model"]) == ("mean", True, str(quiet_minilm))


@pytest.mark.skipif(not MINI.is_dir(), reason="data/debian-pkgs-mini not built")
@pytest.mark.parametrize("method", ["srl", "2dmse", "separate", "full"])
def test_each_method_config_runs(tmp_path, method, quiet_minilm, monkeypatch):
    """configs/<method>.yaml, shrunk to one small step: the sizes it visits are the method's (the paper's
    definitions) and every loss term equals the plain HF computation on the step's batch."""
    from transformers import AutoConfig

    batches = first_batch(monkeypatch)
    result = train(
        REPO / "configs" / f"{method}.yaml",
        f"output_dir={tmp_path / method}",
        "train.max_steps=1",
        "train.batch_size=2",
        "train.group_size=2",
        "model.query_max_length=8",
        "model.passage_max_length=16",
        f"data.corpus={MINI}",
        f"data.train={MINI / 'train.jsonl.gz'}",
        f"model.name_or_path={quiet_minilm}",
        "train.dataloader_workers=0",
        "train.logging_steps=1",
    )
    meta = read_meta(result.model_dir)
    assert meta["method"] == method and result.steps == 1
    assert len(meta["sizes"]) == (1 if method == "separate" else 6)
    named = {
        "demi": (1, 32),
        "short": (2, 64),
        "tall": (3, 96),
        "grande": (4, 128),
        "venti": (5, 256),
        "trenta": (6, 384),
    }  # configs/default.yaml
    (line,) = log_lines(tmp_path / method)
    visited = {k[3:]: named.get(k[3:]) or tuple(map(int, k[3:].split("x"))) for k in line if k.startswith("ce/")}
    if method == "srl":
        assert visited == named
    elif method == "full":
        assert visited == {"trenta": (6, 384)}
    elif method == "separate":
        assert visited == {"grande": (4, 128)}
        assert AutoConfig.from_pretrained(result.model_dir).num_hidden_layers == 4  # the model has only its layers
    else:  # 2DMSE: one sampled (n, d) with n < N, d < D, and its three partners (the paper's Eq. 3)
        ((n, d),) = {s for s in visited.values() if s[0] < 6 and s[1] < 384}
        assert sorted(visited.values()) == sorted([(n, d), (n, 384), (6, d), (6, 384)])
    expected = plain_terms(quiet_minilm, batches[0], visited, temperature=0.05)
    assert set(expected) == {k for k in line if k.startswith(("ce/", "kl/"))}
    for key, value in expected.items():
        assert line[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    reduce = sum if method == "2dmse" else lambda terms: sum(terms) / len(visited)  # 2DMSE sums, SRL averages
    assert line["loss"] == pytest.approx(reduce(expected.values()), rel=1e-4)


def test_check_groups_pads_short_groups_and_refuses_empty_ones(capsys):
    from retrieval.data import TrainGroup, sample_negatives
    from train.finetune import check_groups

    groups = [TrainGroup("q1", "a", ["p1"], ["n1", "n2", "n3"]), TrainGroup("q2", "b", ["p2"], ["n4"])]
    assert check_groups(groups, 4, "x.jsonl") == 1
    assert "fewer than 3 hard negatives" in capsys.readouterr().err
    assert sorted(sample_negatives(groups[1], 3, 0, 0)) == ["n4", "n4", "n4"]  # padded by repetition
    assert check_groups(groups, 2, "x.jsonl") == 0
    with pytest.raises(StarbucksError, match="have none"):
        check_groups(groups + [TrainGroup("q3", "c", ["p3"], [])], 4, "x.jsonl")


def test_length_buckets_setting():
    from train.finetune import length_buckets

    assert length_buckets(3) == 3
    assert length_buckets("auto") == (0 if torch.cuda.is_available() else 1)
    for bad in (0, -2, "many", True):
        with pytest.raises(StarbucksError, match="train.length_buckets"):
            length_buckets(bad)


def test_length_buckets_count_in_the_fingerprint_because_dropout_sees_another_order():
    """Sub-batches draw dropout masks in another order, so a bucket count changes a training run: a
    resume must not change it (bookkeeping keys may change)."""
    from conftest import tiny_bert
    from train.trainer import config_fingerprint

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 25, (32,), generator=g)
    batch = {
        "input_ids": torch.randint(5, 1000, (32, 24), generator=g),
        "attention_mask": (torch.arange(24)[None, :] < lengths[:, None]).long(),
    }  # 2 buckets of 16 rows
    size = [Size("", 4, 32)]
    outs = {}
    for buckets in (1, 2):
        enc = StarbucksEncoder(tiny_bert(layers=4, seed=1), pooling="cls").train()  # BERT's dropout 0.1
        enc.length_buckets = buckets
        enc.packing = False  # length buckets split padded batches
        torch.manual_seed(3)
        outs[buckets] = enc.embed(batch, size)[size[0]].detach()
    assert not torch.allclose(outs[1], outs[2], atol=1e-3)

    def fingerprint(*overrides):
        return config_fingerprint(load_config(None, list(overrides)))

    assert fingerprint("train.length_buckets=2") != fingerprint("train.length_buckets=1")
    assert fingerprint("train.save_steps=7", "train.logging_steps=3") == fingerprint("train.save_steps=9")


def test_the_optimizer_is_adamw_with_decay_on_matrices_fused_on_the_cpu():
    """The trainer's optimizer (PyTorch's fused AdamW on the CPU) takes the steps of a plain
    single-tensor AdamW with weight decay on the matrices only."""
    from train.trainer import TrainSettings, build_optimizer

    settings = TrainSettings.from_config(load_config(REPO / "configs" / "demo.yaml", ["train.weight_decay=0.1"]))
    models = [tiny_bert(layers=2, seed=3) for _ in range(2)]
    optimizer = build_optimizer(models[0], settings, torch.device("cpu"))
    assert all(group["fused"] for group in optimizer.param_groups)
    params = [p for p in models[1].parameters()]
    plain = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=settings.learning_rate,
        foreach=False,
    )
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for model in models:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad.clone()
        optimizer.step()
        plain.step()
    assert_all_near(list(models[0].parameters()), list(models[1].parameters()), rel=1e-6)
    before = tiny_bert(layers=2, seed=3)
    moved = [float((a - b).detach().norm()) for a, b in zip(models[0].parameters(), before.parameters())]
    assert min(moved) > 0  # every parameter took the steps
