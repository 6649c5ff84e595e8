"""`retrieval.st_loss.StarbucksSTLoss` for sentence-transformers: equal to the toolkit's own loss on the
same embeddings (and to hand-computed terms), a stop-gradient teacher, the cached losses, a short
SentenceTransformerTrainer run, and a saved model that the toolkit encodes at every size."""

import gzip
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, assert_all_near, assert_near, tiny_bert
from retrieval.errors import StarbucksError
from retrieval.losses import InfoNCE, StarbucksLoss as ToolkitLoss
from retrieval.checkpoint import resolve_model_path
from retrieval.sizes import Size

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    CoSENTLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer  # noqa: E402

from retrieval.st_loss import StarbucksSTLoss, at_size, embed_sizes, save_for_starbucks  # noqa: E402

SIZES = [(1, 8), (2, 16), (4, 32)]
TRAIN = REPO / "examples" / "data" / "debian-pairs-train.jsonl.gz"
ANCHORS = ["a game of ancient warfare", "edit pdf files", "an irc client", "python docs", "tools for tex"]
POSITIVES = [
    "Real-time strategy game.",
    "A PDF editor for the desktop.",
    "Chat on IRC networks.",
    "The documentation of Python.",
    "TeX and LaTeX utilities.",
]
NEGATIVES = ["A chess engine.", "An image viewer.", "A mail reader.", "A Perl module.", "A font package."]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny random 4-layer, 32-dim BERT with MiniLM's tokenizer, saved as an HF directory."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-st")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def st_model(backbone, pooling="mean", normalize=True):
    modules = [Transformer(str(backbone), max_seq_length=32), Pooling(32, pooling)]
    return SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu")


def columns(model, *texts):
    return [model.preprocess(list(t)) for t in texts]


def plain_embeddings(model, features, size: Size, pooling="mean", normalize=True):
    """A plain HF forward: hidden_states[n], pooled by hand, the first d dims."""
    bert = model[0].auto_model
    out = bert(input_ids=features["input_ids"], attention_mask=features["attention_mask"], output_hidden_states=True)
    states = out.hidden_states[size.layers][..., : size.dim]
    if pooling == "cls":
        vec = states[:, 0]
    else:
        mask = features["attention_mask"].unsqueeze(-1).float()
        vec = (states * mask).sum(1) / mask.sum(1)
    return F.normalize(vec, dim=-1) if normalize else vec


def test_equals_the_toolkit_loss_and_hand_computed_terms(backbone):
    model = st_model(backbone).eval()
    feats = columns(model, ANCHORS, POSITIVES, NEGATIVES)
    loss = StarbucksSTLoss(model, MultipleNegativesRankingLoss(model, scale=20.0), sizes=SIZES, kl_temperature=0.3)
    value = loss(feats, None)

    sizes = [Size(f"s{i}", n, d) for i, (n, d) in enumerate(SIZES)]
    emb = {s: [plain_embeddings(model, f, s) for f in feats] for s in sizes}
    # the toolkit's layout: passages of query i at i*g .. i*g+g-1, positive first
    q = {s: emb[s][0] for s in sizes}
    p = {s: torch.stack([emb[s][1], emb[s][2]], dim=1).flatten(0, 1) for s in sizes}
    toolkit = ToolkitLoss(InfoNCE(temperature=1 / 20), sizes, kl_weight=1.0, kl_temperature=0.3)(q, p)
    torch.testing.assert_close(value, toolkit.loss, rtol=1e-5, atol=1e-6)

    teacher = sizes[-1]
    hand_total = 0.0
    for s in sizes:  # by hand: MNRL's scores (cosine x 20) over [positives; negatives]
        logits = 20 * emb[s][0] @ torch.cat([emb[s][1], emb[s][2]]).T
        ce = -(logits.log_softmax(1).diagonal()).mean()
        torch.testing.assert_close(toolkit.terms[f"ce/{s.name}"], ce, rtol=1e-5, atol=1e-6)
        term = ce
        if s != teacher:
            t_logits = 20 * emb[teacher][0] @ torch.cat([emb[teacher][1], emb[teacher][2]]).T
            p_t, p_s = (t_logits / 0.3).softmax(1), (logits / 0.3).softmax(1)
            kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
            torch.testing.assert_close(toolkit.terms[f"kl/{s.name}"], kl, rtol=1e-4, atol=1e-6)
            term = term + kl
        hand_total = hand_total + term
    torch.testing.assert_close(value, hand_total / len(sizes), rtol=1e-4, atol=1e-6)


def test_the_kl_teacher_gets_no_gradient(backbone):
    model = st_model(backbone).eval()
    loss = StarbucksSTLoss(model, MultipleNegativesRankingLoss(model), sizes=SIZES)
    small, full = loss.sizes[0], loss.sizes[-1]
    torch.manual_seed(0)
    cols = {s: [torch.randn(5, s.dim, requires_grad=True) for _ in range(2)] for s in (small, full)}
    loss.kl_term(cols, small, full).backward()
    assert all(t.grad is None for t in cols[full])
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in cols[small])


def test_cached_loss_gives_the_same_loss_and_gradients(backbone):
    grads, values = [], []
    for base in (MultipleNegativesRankingLoss, lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=2)):
        model = st_model(backbone).eval()
        loss = StarbucksSTLoss(model, base(model), sizes=SIZES)
        value = loss(columns(model, ANCHORS, POSITIVES, NEGATIVES), None)
        value.backward()
        values.append(value.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(values[0], values[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert_all_near(grads[1], grads[0], rel=1e-5)


def test_other_base_losses_and_2dmse(backbone):
    model = st_model(backbone).eval()
    feats = columns(model, ANCHORS, POSITIVES)
    labels = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])
    loss = StarbucksSTLoss(model, CoSENTLoss(model), sizes=SIZES, method="2dmse", seed=3)
    value = loss(feats, labels)
    sizes = loss.step_sizes  # what this step sampled: (n, d), (n, D), (N, d), (N, D), summed
    assert len(sizes) == 4 and sizes[-1] == loss.sizes.largest and sizes[0].layers < 4 and sizes[0].dim < 32
    cols = loss.embed_columns(feats, sizes)
    torch.testing.assert_close(value, sum(loss.size_terms(cols, labels, sizes).values()))


def test_bad_input_is_one_clear_error(backbone):
    model = st_model(backbone)
    with pytest.raises(StarbucksError, match="asks for 6 layers but .* has only 4"):
        StarbucksSTLoss(model, sizes=[(6, 32)])
    with pytest.raises(StarbucksError, match="needs sizes"):
        StarbucksSTLoss(model)
    dense = SentenceTransformer(modules=[Transformer(str(backbone)), Pooling(32), Dense(32, 16)], device="cpu")
    with pytest.raises(StarbucksError, match="Dense"):
        StarbucksSTLoss(dense, sizes=SIZES)


def test_a_short_trainer_run_lowers_the_loss_at_every_size(backbone, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    rows = [json.loads(line) for line in gzip.open(TRAIN, "rt")][:64]
    data = Dataset.from_list([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows])
    torch.manual_seed(0)
    model = st_model(backbone)
    loss = StarbucksSTLoss(model, MultipleNegativesRankingLoss(model), sizes=SIZES)
    probe = columns(model, data["anchor"][:16], data["positive"][:16])

    def per_size():
        model.eval()
        with torch.no_grad():
            cols = loss.embed_columns(probe, loss.sizes)
            return {s.key: loss.loss.compute_loss_from_embeddings(cols[s], None).item() for s in loss.sizes}

    before = per_size()
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=3,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        warmup_ratio=0.0,
        save_strategy="no",
        report_to="none",
        logging_steps=100,
        seed=0,
        use_cpu=True,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    after = per_size()
    assert all(after[k] < 0.9 * before[k] for k in before), (before, after)


def test_saved_model_encodes_the_same_in_the_toolkit_at_every_size(backbone, tmp_path):
    from retrieval import StarbucksModel

    for pooling, normalize in [("mean", True), ("cls", False)]:
        model = st_model(backbone, pooling, normalize).eval()
        directory = save_for_starbucks(model, tmp_path / pooling, SIZES)
        loaded = StarbucksModel.from_pretrained(directory, device="cpu")
        assert [(s.layers, s.dim) for s in loaded.sizes] == SIZES
        feats = model.preprocess(POSITIVES)
        with torch.no_grad():
            ours = embed_sizes(model, feats, list(loaded.sizes))
        for size in loaded.sizes:
            torch.testing.assert_close(
                torch.from_numpy(loaded.encode(POSITIVES, size=size)), ours[size], rtol=1e-4, atol=1e-5
            )
            with at_size(model, (size.layers, size.dim)):  # what an ST evaluator sees at that size
                torch.testing.assert_close(
                    model.encode(POSITIVES, convert_to_tensor=True), ours[size], rtol=1e-4, atol=1e-5
                )


def test_the_example_script_trains_evaluates_and_saves(backbone, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("st_starbucks", REPO / "examples" / "st_starbucks.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    pairs = tmp_path / "pairs.jsonl"  # 40 of the shipped eval pairs: quick to score at three sizes, twice
    with gzip.open(REPO / "examples" / "data" / "debian-pairs-eval.jsonl.gz", "rt") as f:
        pairs.write_text("".join(f.readlines()[:40]))
    example.main(
        [
            "--model",
            str(backbone),
            "--pooling",
            "mean",
            "--sizes",
            "1x8,2x16,4x32",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--max-seq-length",
            "32",
            "--eval",
            str(pairs),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 1x8 |") or line.startswith("| 4x32 |")]
    assert len(rows) == 2 and "encodes it at every size (8, 16, 32 dims)" in out


def test_the_old_name_still_imports_with_a_warning():
    import retrieval.st_loss as st_loss

    with pytest.warns(FutureWarning, match="now StarbucksSTLoss"):
        assert st_loss.StarbucksLoss is StarbucksSTLoss


def test_2dmse_draws_with_the_trainers_sampler(backbone):
    from retrieval.samplers import TwoDMSESizes

    model = st_model(backbone).eval()
    loss = StarbucksSTLoss(model, MultipleNegativesRankingLoss(model), sizes=SIZES, method="2dmse", seed=5)
    sampler = TwoDMSESizes(loss.sizes, 5, "list")  # d from the list's dims below D, as ST's Matryoshka2dLoss
    assert [loss.sample_sizes() for _ in range(20)] == [sampler.at(step) for step in range(20)]


def test_saved_model_keeps_each_sides_length_and_prompt(backbone, tmp_path):
    """A model whose Transformer cuts queries shorter than documents, with ST prompts: the toolkit's
    query and passage vectors are ST's encode_query / encode_document vectors."""
    from retrieval import StarbucksModel

    model = st_model(backbone, "mean", True).eval()
    model[0].query_length, model[0].document_length = 6, 20
    model.prompts = {"query": "query: ", "document": "passage: "}
    directory = save_for_starbucks(model, tmp_path / "sides", SIZES)
    loaded = StarbucksModel.from_pretrained(directory, device="cpu")
    assert (loaded.query_max_length, loaded.passage_max_length) == (6, 20)
    long_queries = [" ".join([a] * 12) for a in ANCHORS]  # longer than 6 tokens
    largest = loaded.sizes.largest
    assert_near(
        loaded.encode_queries(long_queries, size=largest),
        model.encode_query(long_queries, convert_to_numpy=True),
        rel=1e-5,
    )
    assert_near(
        loaded.encode_passages(POSITIVES, size=largest),
        model.encode_document(POSITIVES, convert_to_numpy=True),
        rel=1e-5,
    )
