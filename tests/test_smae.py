"""SMAE pre-training: masking, packing, text sources, the per-size loss, the saved backbone."""

import gzip
import json
import random

import pytest
import torch
import torch.nn.functional as F

from retrieval.errors import StarbucksError
from retrieval.checkpoint import resolve_model_path
from retrieval.sizes import Size, SizeList
from train.masking import IGNORE, SMAECollator, build_windows, iter_texts, pack_windows
from train.smae import SMAE

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SIZES = SizeList([Size("s1", 1, 8), Size("s2", 2, 16), Size("s3", 3, 24), Size("full", 3, 32)])
WORDS = [
    "package",
    "library",
    "unbelievably",
    "tokenization",
    "of",
    "the",
    "xkcdian",
    "gtk",
    "debian",
    "cross-platform",
    "runtime",
    "daemon",
    "zeroconf",
    "a",
    "is",
    "fast",
    "multithreaded",
    "preprocessor",
    ".",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM))


def tiny_mlm(vocab=30522, hidden=32, layers=3, seed=0, init=0.2):
    """A random BertForMaskedLM; a large init range makes attention (and so masks) matter."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        initializer_range=init,
    )
    return BertForMaskedLM(config)


def random_texts(n, seed=0, length=(3, 40)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*length))) for _ in range(n)]


# ---------------------------------------------------------------- the loss, by hand


def hand_transform(mlm, x, dim):
    """The authors' cut head transform (ielab/Starbucks smae/modeling.py:14-27), in plain torch ops:
    the dense layer's first `dim` input columns, GELU, then LayerNorm over the full width."""
    t = mlm.cls.predictions.transform
    h = F.gelu(F.linear(x[..., :dim], t.dense.weight[:, :dim], t.dense.bias))
    return F.layer_norm(h, (h.shape[-1],), t.LayerNorm.weight, t.LayerNorm.bias, t.LayerNorm.eps)


def hand_head(mlm, states, dim):
    """BERT's MLM head with the dense layer cut to its first `dim` input columns, in plain torch ops."""
    return hand_transform(mlm, states, dim) @ mlm.bert.embeddings.word_embeddings.weight.T + mlm.cls.predictions.bias


def hand_pool(states, mask, pooling):
    """The CLS token's vector, or the mean over the real tokens."""
    if pooling == "cls":
        return states[:, 0]
    return torch.stack([row[m.bool()].mean(0) for row, m in zip(states, mask)])


def randomise_head(mlm):
    """Non-zero biases and a non-trivial LayerNorm, so that a dropped piece of the head would show."""
    t = mlm.cls.predictions.transform
    with torch.no_grad():
        t.dense.bias.normal_()
        t.LayerNorm.weight.uniform_(0.5, 1.5)
        t.LayerNorm.bias.normal_(std=0.1)
        mlm.cls.predictions.bias.normal_()


def hand_ce(logits, targets):
    return -(torch.log_softmax(logits, -1).gather(1, targets[:, None])).mean()


def hand_batch(vocab=30522, mask_id=103):
    """Two rows, the second padded; explicit encoder and decoder masks."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(vocab // 3, vocab, (2, 10), generator=g)
    ids[:, 0], ids[0, 9], ids[1, 7] = 101, 102, 102
    attention = torch.ones_like(ids)
    attention[1, 8:] = 0
    ids[1, 8:] = 0
    enc_pos = [(0, 2), (0, 3), (0, 7), (1, 1), (1, 5)]
    dec_pos = [(0, 1), (0, 2), (0, 4), (0, 5), (0, 8), (1, 2), (1, 3), (1, 6)]

    def masked(positions):
        inp, labels = ids.clone(), torch.full_like(ids, IGNORE)
        for r, c in positions:
            labels[r, c], inp[r, c] = ids[r, c], mask_id
        return inp, labels

    enc_ids, labels = masked(enc_pos)
    dec_ids, dec_labels = masked(dec_pos)
    return {
        "input_ids": enc_ids,
        "attention_mask": attention,
        "labels": labels,
        "decoder_input_ids": dec_ids,
        "decoder_labels": dec_labels,
    }


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_loss_equals_hand_computation_per_size(pooling):
    # The authors' code (smae/modeling.py:159-171): per size, the encoder's MLM through the cut head, the
    # decoder's MLM from the cut head transform of the sub-size vector at position 0, (enc + dec) / 2;
    # mean over the sizes.
    mlm = tiny_mlm()
    randomise_head(mlm)
    model = SMAE(mlm, SIZES, pooling=pooling).eval()
    batch = hand_batch()
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(batch)
        hidden = mlm.bert(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True).hidden_states
        embedded = mlm.bert.embeddings(input_ids=batch["decoder_input_ids"])
        pad = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        enc_pick, dec_pick = batch["labels"] != IGNORE, batch["decoder_labels"] != IGNORE
        expected = []
        for s in SIZES:
            h = hidden[s.layers]
            enc = hand_ce(hand_head(mlm, h[enc_pick], s.dim), batch["labels"][enc_pick])
            first = hand_transform(mlm, hand_pool(h[..., : s.dim], mask, pooling), s.dim)
            decoded = model.decoder[0](torch.cat([first[:, None], embedded[:, 1:]], dim=1), attention_mask=pad)
            decoded = decoded[0] if isinstance(decoded, tuple) else decoded
            dec = hand_ce(hand_head(mlm, decoded[dec_pick], 32), batch["decoder_labels"][dec_pick])
            torch.testing.assert_close(out.terms[f"enc/{s.name}"], enc, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.terms[f"dec/{s.name}"], dec, rtol=1e-5, atol=1e-5)
            expected.append((enc + dec) / 2)
    torch.testing.assert_close(out.loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-5)
    assert set(out.terms) == {"loss"} | {f"{part}/{s.name}" for s in SIZES for part in ("enc", "dec")}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bottleneck_is_the_cut_head_transform_of_the_pooled_sub_vector(pooling):
    # The authors' code: the decoder's position 0 is the head's whole transform (cut dense, activation,
    # LayerNorm) of the sub-size vector, not the paper's Eq. 7 dense layer alone; the pooling is the
    # fine-tune's (model.pooling).
    mlm = tiny_mlm()
    randomise_head(mlm)
    model = SMAE(mlm, SIZES, pooling=pooling).eval()
    batch = hand_batch()
    mask = batch["attention_mask"]
    states = torch.randn(2, 10, 32)
    with torch.no_grad():
        for dim in (8, 32):
            expected = hand_transform(mlm, hand_pool(states[..., :dim], mask, pooling), dim)
            torch.testing.assert_close(model.bottleneck(states, mask, dim), expected, rtol=1e-5, atol=1e-5)
        # ... normalised like the embeddings beside it: with the LayerNorm's identity affine, each vector
        # has mean 0 and variance 1 over the full width
        norm = mlm.cls.predictions.transform.LayerNorm
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        first = model.bottleneck(states, mask, 8)
        assert first.shape == (2, 32)
        torch.testing.assert_close(first.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(first.var(-1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    # ... and it is what the decoder gets at position 0, for every size
    randomise_head(mlm)
    seen = []
    model.decoder[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 0].clone()))
    with torch.no_grad():
        model(batch)
        hidden = mlm.bert(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True).hidden_states
        for s, first in zip(SIZES, seen[0].chunk(len(SIZES))):
            want = hand_transform(mlm, hand_pool(hidden[s.layers][..., : s.dim], mask, pooling), s.dim)
            torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-5)


def test_every_part_gets_gradients_and_the_head_is_tied():
    mlm = tiny_mlm()
    model = SMAE(mlm, SIZES)
    # SMAE's head predicts with the encoder's own word embeddings (shared, not copied)
    assert model.head.predictions.decoder.weight is model.encoder.backbone.embeddings.word_embeddings.weight
    model(hand_batch()).loss.backward()
    for name, p in model.named_parameters():
        if "token_type" in name:  # one segment only
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def tiny_roberta(seed=0):
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(seed)
    return RobertaForMaskedLM(
        RobertaConfig(
            vocab_size=500,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            initializer_range=0.2,
        )
    )


def assert_same_state(module, other):
    a, b = module.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("depth", [1, 2])
def test_decoder_starts_as_a_copy_of_the_encoders_first_layers(arch, depth):
    # The authors' code: the decoder is the checkpoint's first layer (a second copy of the checkpoint cut
    # to one layer, smae/modeling.py:100, :103); a deeper decoder takes the first `depth` layers.
    mlm = tiny_mlm(vocab=500) if arch == "bert" else tiny_roberta()
    first = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in mlm.base_model.encoder.layer]
    model = SMAE(mlm, SIZES, decoder_layers=depth)
    assert len(model.decoder) == depth
    for i, layer in enumerate(model.decoder):
        assert type(layer) is type(model.encoder.layers[i])
        assert_same_state(layer, model.encoder.layers[i])
        state = layer.state_dict()
        assert state.keys() == first[i].keys() and all(torch.equal(state[k], first[i][k]) for k in state)
    # ... its own tensors, not the encoder's
    encoder_tensors = {p.data_ptr() for p in model.encoder.parameters()}
    assert not any(p.data_ptr() in encoder_tensors for p in model.decoder.parameters())
    # one optimiser step on a loss of the decoder alone moves the decoder and leaves encoder layer 0 as it was
    layer0 = {k: v.clone() for k, v in model.encoder.layers[0].state_dict().items()}
    optimiser = torch.optim.SGD(model.decoder.parameters(), lr=0.5)
    states = torch.randn(2, 6, 32)
    model.decode(states, torch.ones(2, 6, dtype=torch.long)).pow(2).mean().backward()
    optimiser.step()
    after = model.encoder.layers[0].state_dict()
    assert all(torch.equal(after[k], layer0[k]) for k in layer0)
    assert all(p.grad is None for p in model.encoder.layers[0].parameters())
    moved = model.decoder[0].state_dict()
    assert any(not torch.equal(moved[k], layer0[k]) for k in layer0)


def test_a_decoder_deeper_than_the_encoder_is_refused():
    with pytest.raises(StarbucksError, match="decoder_layers = 4.*only 3"):
        SMAE(tiny_mlm(vocab=500), SIZES, decoder_layers=4)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_full_width_head_is_the_checkpoints_own_head(arch):
    if arch == "bert":
        mlm, head = tiny_mlm(vocab=500), lambda m, x: m.cls(x)
    else:
        mlm, head = tiny_roberta(), lambda m, x: m.lm_head(x)
    model = SMAE(mlm, SIZES).eval()
    states = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.vocab_logits(states, 32), head(mlm, states))
        batch = hand_batch(vocab=500, mask_id=4)
        assert torch.isfinite(model(batch).loss)


def test_sizes_beyond_the_model_are_refused():
    with pytest.raises(StarbucksError, match="only 3"):
        SMAE(tiny_mlm(), SizeList([Size("x", 4, 8)]))


# ---------------------------------------------------------------- head reuse, saving


def test_head_is_reused_from_a_checkpoint_else_tied_to_embeddings(tmp_path, tokenizer):
    from transformers import BertModel

    mlm = tiny_mlm(seed=1)
    with torch.no_grad():
        mlm.cls.predictions.transform.dense.weight.fill_(0.125)
    mlm.save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    model, _, from_checkpoint = SMAE.from_pretrained(str(tmp_path / "mlm"), SIZES)
    assert from_checkpoint
    assert torch.all(model.head.predictions.transform.dense.weight == 0.125)
    assert_same_state(model.decoder[0], mlm.bert.encoder.layer[0])  # the checkpoint's first layer

    torch.manual_seed(5)
    plain = BertModel(mlm.config)
    plain.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    model, _, from_checkpoint = SMAE.from_pretrained(str(tmp_path / "plain"), SIZES)
    assert not from_checkpoint
    assert_same_state(model.decoder[0], plain.encoder.layer[0])  # a headless checkpoint's too
    words = model.encoder.backbone.embeddings.word_embeddings.weight
    assert model.head.predictions.decoder.weight is words
    assert model.head.predictions.decoder.weight.data_ptr() == words.data_ptr()  # one storage, as BERT's
    with torch.no_grad():
        words[7, 3] = 1.5
    assert model.head.predictions.decoder.weight[7, 3] == 1.5
    assert all(p is not words for p in model.head_parameters())  # the warm-up leaves the embeddings alone


def test_saved_backbone_is_the_encoder_only(tmp_path, tokenizer):
    from safetensors.torch import load_file
    from transformers import AutoModel

    model = SMAE(tiny_mlm(), SIZES)
    model.save_encoder(tmp_path / "model", tokenizer)
    loaded = AutoModel.from_pretrained(tmp_path / "model")
    keys = set(load_file(tmp_path / "model" / "model.safetensors"))
    encoder_state = model.encoder.backbone.state_dict()
    assert keys <= set(encoder_state) and not any(k.startswith(("cls", "decoder", "head")) for k in keys)
    for key, value in loaded.state_dict().items():
        if not key.startswith("pooler"):  # the saved backbone has no pooler; AutoModel adds a fresh one
            assert torch.equal(value, encoder_state[key]), key
    with torch.no_grad():  # a trained decoder, no longer the copy of layer 0 it started as
        model.decoder[0].output.dense.weight.add_(1.0)
    model.save_encoder(tmp_path / "trained", tokenizer)
    first = load_file(tmp_path / "trained" / "model.safetensors")["encoder.layer.0.output.dense.weight"]
    assert torch.equal(first, model.encoder.layers[0].output.dense.weight)
    assert not torch.equal(first, model.decoder[0].output.dense.weight)
    meta = json.loads((tmp_path / "model" / "starbucks.json").read_text())
    assert meta["method"] == "smae" and [s["name"] for s in meta["sizes"]] == SIZES.names


# ---------------------------------------------------------------- masking


def build(tmp_path, texts, tokenizer, max_length=64, **kwargs):
    return build_windows(tmp_path / "windows", lambda: iter(texts), tokenizer, max_length, {"source": "test"}, **kwargs)


@pytest.fixture(scope="module")
def windows(tokenizer, tmp_path_factory):
    texts = random_texts(600) + ["a [SEP] literal [MASK] and [UNK] tokens"] * 5
    return build(tmp_path_factory.mktemp("w"), texts, tokenizer)


def items_of(windows, n=None, epoch=0):
    return [windows[(i, epoch)] for i in range(n or len(windows))]


def word_ids_of(items):
    return torch.stack([i["word_starts"] for i in items]).cumsum(1)


def test_mask_ratios_hold_on_a_large_sample(tokenizer, windows):
    batch = SMAECollator(tokenizer)(items_of(windows))
    ids = batch["input_ids"].where(batch["labels"] == IGNORE, batch["labels"])
    maskable = ~torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert maskable.sum() > 10000
    enc, dec = batch["labels"] != IGNORE, batch["decoder_labels"] != IGNORE
    assert abs(enc.sum() / maskable.sum() - 0.2) < 0.015
    assert abs(dec.sum() / maskable.sum() - 0.4) < 0.015
    assert abs((enc & dec).sum() / maskable.sum() - 0.08) < 0.015  # two independent maskings
    # BERT-style replacement: 80% [MASK], 10% random, 10% unchanged.
    masked_in, original = batch["input_ids"][enc], batch["labels"][enc]
    assert abs((masked_in == tokenizer.mask_token_id).float().mean() - 0.8) < 0.03
    assert abs((masked_in == original).float().mean() - 0.1) < 0.03
    assert torch.equal(batch["decoder_input_ids"][~dec], ids[~dec])


def test_masks_depend_only_on_seed_and_item_keys(tokenizer, windows):
    collator = SMAECollator(tokenizer, seed=7)
    first = collator(items_of(windows, 8))
    assert all(torch.equal(first[k], v) for k, v in collator(items_of(windows, 8)).items())
    other_epoch = collator(items_of(windows, 8, epoch=1))
    assert not torch.equal(first["labels"], other_epoch["labels"])
    assert not torch.equal(first["labels"], SMAECollator(tokenizer, seed=8)(items_of(windows, 8))["labels"])


def test_mask_only_replacement(tokenizer, windows):
    batch = SMAECollator(tokenizer, replace="mask", enc_ratio=0.3)(items_of(windows, 50))
    for inp, lab in (("input_ids", "labels"), ("decoder_input_ids", "decoder_labels")):
        picked = batch[lab] != IGNORE
        assert picked.any() and torch.all(batch[inp][picked] == tokenizer.mask_token_id)


def test_whole_words_are_masked_together(tokenizer, windows):
    items = items_of(windows)
    batch = SMAECollator(tokenizer)(items)
    word_ids = word_ids_of(items)
    normal = ~torch.isin(torch.stack([i["input_ids"] for i in items]), torch.tensor(tokenizer.all_special_ids))
    split_words = 0
    for labels in (batch["labels"], batch["decoder_labels"]):
        masked = labels != IGNORE
        for row in range(len(word_ids)):
            for w in word_ids[row].unique():
                pieces = masked[row][(word_ids[row] == w) & normal[row]]
                split_words += len(pieces) > 1 and bool(pieces.any())
                assert pieces.all() or not pieces.any()
    assert split_words > 100  # masked multi-piece words ("unbelievably", "xkcdian") were exercised
    tokens = tokenizer.convert_ids_to_tokens(items[0]["input_ids"])
    for i, tok in enumerate(tokens):  # a "##" piece continues the previous token's word
        assert items[0]["word_starts"][i] == (0 if tok.startswith("##") else 1)


def test_special_tokens_and_padding_are_never_masked(tokenizer, windows):
    items = items_of(windows)
    short = {"input_ids": items[0]["input_ids"][:20], "word_starts": items[0]["word_starts"][:20], "key": (-1, 0)}
    items.append(short)
    batch = SMAECollator(tokenizer, enc_ratio=0.9, dec_ratio=0.9)(items)
    ids = torch.stack([F.pad(w["input_ids"], (0, 64 - len(w["input_ids"]))) for w in items])
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (batch["attention_mask"] == 0)
    assert (ids == tokenizer.mask_token_id).any() and (batch["attention_mask"] == 0).sum() == 44
    assert special.sum() > len(items) * 2  # CLS, SEP, literal [MASK]/[UNK], padding
    for lab, inp in (("labels", "input_ids"), ("decoder_labels", "decoder_input_ids")):
        assert torch.all(batch[lab][special] == IGNORE)
        assert torch.equal(batch[inp][special], ids[special])
        assert (batch[lab][~special] != IGNORE).float().mean() > 0.8


def test_bad_ratios_are_one_clear_error(tokenizer):
    with pytest.raises(StarbucksError, match="dec_mask_ratio"):
        SMAECollator(tokenizer, dec_ratio=1.5)
    with pytest.raises(StarbucksError, match="mask_replace"):
        SMAECollator(tokenizer, replace="random")


# ---------------------------------------------------------------- packing and sources


def token_stream(texts, tokenizer):
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    return stream


def test_windows_pack_the_token_stream(tokenizer, tmp_path):
    texts = random_texts(40, seed=5)
    stream = token_stream(texts, tokenizer)
    windows = list(pack_windows(texts, tokenizer, 16))
    assert len(windows) == len(stream) // 14
    for i, (ids, starts) in enumerate(windows):
        assert len(ids) == 16 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert list(ids[1:-1]) == stream[i * 14 : (i + 1) * 14]
        assert starts[0] == starts[-1] == 1
    dataset = build(tmp_path, texts, tokenizer, 16)
    assert len(dataset) == len(windows)
    assert all(torch.equal(dataset[(i, 0)]["input_ids"], torch.from_numpy(ids)) for i, (ids, _) in enumerate(windows))
    with pytest.raises(StarbucksError, match="fewer tokens than one window"):
        build(tmp_path / "short", ["too short"], tokenizer, 64)


def test_window_build_resumes_and_stops_at_max_tokens(tokenizer, tmp_path, monkeypatch):
    import train.masking as masking

    texts = random_texts(3000, seed=6)
    expected = [ids for ids, _ in pack_windows(texts, tokenizer, 32)]
    monkeypatch.setattr(masking, "COMMIT_EVERY", 2)

    def killed_after(n):
        for i, t in enumerate(texts):
            if i == n:
                raise KeyboardInterrupt
            yield t

    with pytest.raises(KeyboardInterrupt):
        build_windows(tmp_path / "windows", lambda: killed_after(1700), tokenizer, 32, {"source": "test"})
    progress = json.loads((tmp_path / "windows" / "progress.json").read_text())
    assert progress["texts"] == 6 * masking.TOKENIZE_CHUNK  # the last commit before the kill (chunks 2, 4, 6)
    tokenized = []
    add = masking.WindowPacker.add
    monkeypatch.setattr(masking.WindowPacker, "add", lambda self, chunk: tokenized.extend(chunk) or add(self, chunk))
    resumed = build(tmp_path, texts, tokenizer, 32)
    assert tokenized == texts[1536:]  # resumed after the committed texts
    assert [resumed[(i, 0)]["input_ids"].numpy().tolist() for i in range(len(resumed))] == [
        e.tolist() for e in expected
    ]
    assert not (tmp_path / "windows" / "progress.json").exists()
    assert len(build(tmp_path, texts, tokenizer, 32, max_tokens=32 * 10)) == 10  # another identity: rebuilt


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n second line \n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(
            json.dumps({"body": "one"}) + "\n" + json.dumps({"body": " "}) + "\n" + json.dumps({"body": "two"}) + "\n"
        )
    (tmp_path / "beir").mkdir()
    (tmp_path / "beir" / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "T", "text": "body"}) + "\n")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == ["first line", "second line"]
    assert list(iter_texts(str(tmp_path / "b.jsonl.gz"), text_field="body")) == ["one", "two"]
    assert list(iter_texts(str(tmp_path / "b.jsonl.gz"), text_field="body", max_texts=1)) == ["one"]
    assert list(iter_texts(str(tmp_path / "beir"))) == ["T body"]
    with pytest.raises(StarbucksError, match="no 'text' field"):
        list(iter_texts(str(tmp_path / "b.jsonl.gz")))
    with pytest.raises(StarbucksError, match="not found"):
        list(iter_texts(str(tmp_path / "missing.txt")))


def test_hf_source_streams(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return iter([{"text": "web page one"}, {"text": "web page two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = list(iter_texts("hf:HuggingFaceFW/fineweb", hf_config="sample-10BT", max_texts=1))
    assert texts == ["web page one"]
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT", "train", True)]


# ---------------------------------------------------------------- pre-training runs (train.pretrain)


@pytest.fixture
def headless_base(tmp_path, tokenizer):
    """A tiny random BertModel (no MLM head, like all-MiniLM-L6-v2) saved with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def smae_config(base, output_dir, *overrides):
    from retrieval.config import load_config

    return load_config(
        "configs/smae.yaml",
        [
            f"model.name_or_path={base}",
            f"output_dir={output_dir}",
            "sizes=[1x8,2x16,3x32]",
            "pretrain.max_texts=1500",
            "pretrain.max_length=32",
            "train.batch_size=8",
            "train.learning_rate=1e-3",
            "train.logging_steps=1",
            *overrides,
        ],
    )


def mean_terms(records, prefix):
    values = [v for r in records for k, v in r.items() if k.startswith(prefix)]
    return sum(values) / len(values)


@pytest.mark.slow
def test_short_run_lowers_both_losses_and_finetuning_starts_from_it(tmp_path, headless_base, repo_root):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from retrieval.config import load_config
    from train.finetune import run_training
    from train.pretrain import run_pretraining

    result = run_pretraining(smae_config(headless_base, tmp_path / "smae", "train.max_steps=30"))
    log = [json.loads(line) for line in (tmp_path / "smae" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and {"enc/1x8", "dec/1x8", "enc/3x32", "dec/3x32"} <= set(log[0])
    for part in ("enc/", "dec/"):  # first vs last 10% of the steps
        assert mean_terms(log[-3:], part) < mean_terms(log[:3], part) - 0.1, part

    pretrained = AutoModel.from_pretrained(result.model_dir).state_dict()
    base = AutoModel.from_pretrained(headless_base).state_dict()
    meta = json.loads((result.model_dir / "starbucks.json").read_text())
    assert meta["method"] == "smae" and meta["mlm_head"] == "new" and meta["pooling"] == "mean"
    assert meta["head_warmup"]["steps"] == 100 and meta["bottleneck_pooling"] == "mean"
    assert meta["head_warmup"]["mlm_loss_after"] < meta["head_warmup"]["mlm_loss_before"]

    finetune = load_config(
        repo_root / "configs" / "default.yaml",
        [
            f"model.name_or_path={result.model_dir}",
            f"output_dir={tmp_path / 'ft'}",
            "sizes=[1x8,2x16,3x32]",
            f"data.corpus={repo_root / 'data/debian-pkgs-mini'}",
            f"data.train={repo_root / 'data/debian-pkgs-mini/train.jsonl.gz'}",
            "data.max_train_groups=8",
            "train.max_steps=1",
            "train.batch_size=2",
            "train.group_size=2",
            "train.learning_rate=1e-12",
            "model.query_max_length=16",
            "model.passage_max_length=48",
        ],
    )
    tuned = load_file(run_training(finetune).model_dir / "model.safetensors")
    key = "encoder.layer.2.output.dense.weight"
    torch.testing.assert_close(tuned[key], pretrained[key], atol=1e-6, rtol=0)
    assert (tuned[key] - base[key]).abs().max() > 1e-3


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, headless_base, monkeypatch):
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModel

    from train.pretrain import run_pretraining

    seen = []  # the decoder's weights at each SMAE step (one decode call per step)
    decode = SMAE.decode
    monkeypatch.setattr(
        SMAE,
        "decode",
        lambda self, *args: (
            seen.append({k: v.detach().clone() for k, v in self.decoder.state_dict().items()}) or decode(self, *args)
        ),
    )

    overrides = ("train.max_steps=6", "train.save_steps=3", "train.batch_size=4")
    whole = run_pretraining(smae_config(headless_base, tmp_path / "a", *overrides))
    uninterrupted = seen[:]
    run_pretraining(smae_config(headless_base, tmp_path / "b", *overrides))
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "checkpoint-6")  # as if killed after step 3's checkpoint
    seen.clear()
    resumed = run_pretraining(smae_config(headless_base, tmp_path / "b", *overrides))
    assert resumed.start_step == 3
    a, b = load_file(whole.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The decoder starts as the base's first layer; the resumed run goes on with the decoder trained for
    # 3 steps (from the checkpoint's state), not with a new copy of the base's first layer.
    assert len(uninterrupted) == 6 and len(seen) == 3
    base_layer0 = {
        f"0.{k}": v for k, v in AutoModel.from_pretrained(headless_base).encoder.layer[0].state_dict().items()
    }
    assert uninterrupted[0].keys() == base_layer0.keys()
    assert all(torch.equal(uninterrupted[0][k], base_layer0[k]) for k in base_layer0)
    assert all(torch.equal(seen[0][k], uninterrupted[3][k]) for k in base_layer0)
    assert any(not torch.equal(seen[0][k], base_layer0[k]) for k in base_layer0)


def test_head_warmup_changes_only_the_head_and_reports_the_mlm_loss(tmp_path, headless_base, tokenizer):
    from retrieval.config import load_config
    from train.pretrain import PROBE_WINDOWS, probe_loss, warm_up_head
    from train.trainer import TrainSettings

    model, _, from_checkpoint = SMAE.from_pretrained(str(headless_base), SizeList([Size("a", 1, 8), Size("b", 3, 32)]))
    assert not from_checkpoint
    windows = build(tmp_path, random_texts(300), tokenizer, max_length=32)
    collate = SMAECollator(tokenizer, 0.2, 0.4, "bert", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = probe_loss(model, windows, collate, 8)
    settings = TrainSettings.from_config(
        load_config(
            None,
            [
                "train.max_steps=8",
                "train.batch_size=8",
                "train.learning_rate=3e-3",
                "train.warmup_ratio=0.0",
                "train.save_steps=8",
                "train.logging_steps=4",
            ],
        )
    )
    report = warm_up_head(model, windows, collate, settings, {"test": 1}, tmp_path / "warmup")
    after = model.state_dict()
    head = {f"head.{n}" for n, p in model.head.named_parameters() if any(p is q for q in model.head_parameters())}
    assert head == {
        "head.predictions.bias",
        "head.predictions.transform.dense.weight",
        "head.predictions.transform.dense.bias",
        "head.predictions.transform.LayerNorm.weight",
        "head.predictions.transform.LayerNorm.bias",
    }
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= head | {"head.predictions.decoder.bias"}  # HF may alias the vocab bias
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for SMAE itself
    assert report["steps"] == 8 and report["probe_windows"] == min(PROBE_WINDOWS, len(windows))
    assert report["mlm_loss_before"] == pytest.approx(fresh, abs=1e-4)
    assert report["mlm_loss_after"] == pytest.approx(probe_loss(model, windows, collate, 8), abs=1e-4)
    assert report["mlm_loss_after"] < report["mlm_loss_before"]
    assert (tmp_path / "warmup" / "model" / "head.safetensors").is_file()
    assert (tmp_path / "warmup" / "train_summary.json").is_file()


def test_finetuning_an_smae_checkpoint_with_another_pooling_is_refused(tmp_path):
    from train.smae import check_pretrained_pooling

    (tmp_path / "starbucks.json").write_text(json.dumps({"method": "smae", "pooling": "mean"}))
    check_pretrained_pooling(str(tmp_path), "mean", allowed=False)
    with pytest.raises(StarbucksError, match="mean-pooled bottleneck but model.pooling = cls.*allow_pooling_change"):
        check_pretrained_pooling(str(tmp_path), "cls", allowed=False)
    check_pretrained_pooling(str(tmp_path), "cls", allowed=True)
    (tmp_path / "starbucks.json").write_text(json.dumps({"method": "srl", "pooling": "mean"}))
    check_pretrained_pooling(str(tmp_path), "cls", allowed=False)  # only SMAE's bottleneck binds the pooling


def test_train_data_text_is_the_training_passages_and_queries(tmp_path, tokenizer):
    from retrieval.config import load_config
    from train.pretrain import prepare_windows, text_sources

    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"zeroconf daemon {i}"}) + "\n" for i in range(3))
    )
    queries = ["xkcdian preprocessor", " ".join(["filler"] * 40)]  # the stream's cut-off tail is filler
    (tmp_path / "train.jsonl").write_text(
        "".join(
            json.dumps({"query_id": f"q{i}", "query": q, "positive_document_ids": ["d0"], "negative_document_ids": []})
            + "\n"
            for i, q in enumerate(queries)
        )
    )
    cfg = load_config(
        None,
        [
            "pretrain.text=train-data",
            f"data.corpus={tmp_path}",
            f"data.train={tmp_path / 'train.jsonl'}",
            "pretrain.max_length=16",
        ],
    )
    assert [s["source"] for s in text_sources(cfg)] == [str(tmp_path), str(tmp_path / "train.jsonl")]
    windows = prepare_windows(cfg, tokenizer, tmp_path / "windows")
    text = tokenizer.decode([int(t) for t in windows.input_ids.reshape(-1)], skip_special_tokens=True)
    assert all(f"zeroconf daemon {i}" in text for i in range(3)) and "xkcdian preprocessor" in text


def test_estimate_counts_the_head_warmup_only_for_a_headless_backbone(tmp_path, headless_base, tokenizer):
    """A backbone that ships an MLM head is not warmed up, so the estimate adds no warm-up FLOPs for it."""
    from train.estimate import estimate_training
    from train.smae import ships_mlm_head

    with_head = tmp_path / "with-head"
    tiny_mlm(vocab=len(tokenizer), layers=3).save_pretrained(with_head)
    tokenizer.save_pretrained(with_head)
    assert not ships_mlm_head(str(headless_base)) and ships_mlm_head(str(with_head))

    overrides = ("pretrain.head_warmup_steps=7", "train.max_steps=5")
    estimates = []
    for base in (headless_base, with_head):
        torch.manual_seed(0)  # the estimate draws its mask positions: the same for both
        estimates.append(estimate_training(smae_config(base, tmp_path / base.name, *overrides)))
    headless, headed = estimates
    assert headless["flops_per_step"] == headed["flops_per_step"] and headless["steps"] == headed["steps"] == 5
    assert headed["flops"] == 5 * headed["flops_per_step"]
    warmup = headless["flops"] - 5 * headless["flops_per_step"]
    assert warmup > 0 and warmup % 7 == 0
