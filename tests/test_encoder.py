import pytest
import torch
import torch.nn.functional as F

from conftest import assert_all_near, assert_near, tiny_bert
from retrieval.errors import StarbucksError
from retrieval.checkpoint import load_encoder, read_meta, resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.sizes import Size, SizeList

SIZES = SizeList([Size("a", 1, 8), Size("b", 2, 16), Size("c", 3, 8), Size("d", 4, 32)])


def batch(seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, b, size, pooling, normalize):
    """Pool hidden_states[n][:, :d] of a full forward pass by hand."""
    with torch.no_grad():
        h = model(**b, output_hidden_states=True).hidden_states[size.layers][..., : size.dim]
    if pooling == "cls":
        v = h[:, 0]
    else:
        m = b["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
    return F.normalize(v, dim=-1) if normalize else v


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_size_equals_pooled_hidden_states(pooling, normalize, seed):
    model = tiny_bert(layers=4, hidden=32, seed=seed)
    enc = StarbucksEncoder(model, pooling=pooling, normalize=normalize)
    b = batch(seed)
    with torch.no_grad():
        out = enc.embed(b, SIZES)
    assert list(out) == list(SIZES)
    for size, emb in out.items():
        assert emb.shape == (3, size.dim)
        assert_near(emb, reference(model, b, size, pooling, normalize), rel=1e-5)


def count_layer_calls(enc):
    calls = []
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
    return calls


def test_early_exit_runs_only_the_needed_layers():
    enc = StarbucksEncoder(tiny_bert(layers=4), pooling="cls")
    calls = count_layer_calls(enc)
    with torch.no_grad():
        enc.embed(batch(), [Size("s", 1, 8)])
    assert calls == [0]
    calls.clear()
    with torch.no_grad():
        enc.embed(batch(), SIZES)  # all sizes: one pass to the deepest layer, each layer once
    assert calls == [0, 1, 2, 3]
    calls.clear()
    with torch.no_grad():
        enc.embed(batch(), [Size("x", 2, 8), Size("y", 2, 32)])
    assert calls == [0, 1]
    assert enc.num_layers == 4  # the layer list is restored after the call


def test_gradients_flow_only_through_used_layers():
    enc = StarbucksEncoder(tiny_bert(layers=4), pooling="mean")
    enc.train()
    out = enc.embed(batch(), [Size("s", 2, 16)])
    out[Size("s", 2, 16)].sum().backward()
    grads = [any(p.grad is not None for p in layer.parameters()) for layer in enc.layers]
    assert grads == [True, True, False, False]


def test_size_deeper_than_model_is_a_clear_error():
    enc = StarbucksEncoder(tiny_bert(layers=4, hidden=32))
    with pytest.raises(StarbucksError, match="asks for 10 layers but .* has only 4"):
        enc.embed(batch(), [Size("big", 10, 16)])
    with pytest.raises(StarbucksError, match="asks for 64 dims but .* has only 32"):
        enc.embed(batch(), [Size("wide", 2, 64)])


def test_truncate_keeps_first_layers():
    model = tiny_bert(layers=4)
    b = batch()
    expected = reference(model, b, Size("t", 2, 32), "cls", False)
    enc = StarbucksEncoder(model, pooling="cls").truncate_(2)
    assert enc.num_layers == 2 and enc.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(enc.embed(b, [Size("t", 2, 32)])[Size("t", 2, 32)], expected)


def test_save_and_load_roundtrip(tmp_path):
    from transformers import AutoModel

    path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    enc = StarbucksEncoder(tiny_bert(layers=3, vocab=tok.vocab_size), pooling="mean", normalize=True)
    save_encoder(enc, tmp_path / "m", tok, {"sizes": [s.to_dict() for s in SIZES[:3]]})
    assert read_meta(tmp_path / "m")["pooling"] == "mean"
    loaded, tok2, meta = load_encoder(str(tmp_path / "m"))
    assert (loaded.pooling, loaded.normalize, loaded.num_layers) == ("mean", True, 3)
    assert [s["name"] for s in meta["sizes"]] == ["a", "b", "c"]
    b = tokenize(tok2, ["a small test", "another one here"], max_length=16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed(b, SIZES[:3])[SIZES[2]], enc.eval().embed(b, SIZES[:3])[SIZES[2]])
    assert AutoModel.from_pretrained(tmp_path / "m").config.num_hidden_layers == 3


def test_offline_minilm_backbone_gives_meaningful_embeddings():
    enc, tok, meta = load_encoder("sentence-transformers/all-MiniLM-L6-v2", pooling="mean", normalize=True)
    assert meta == {} and (enc.num_layers, enc.hidden_size) == (6, 384)
    texts = ["a text editor for the terminal", "console editor for text files", "library for image decoding"]
    with torch.no_grad():
        e = enc.eval().embed(tokenize(tok, texts, 32), [Size("full", 6, 384)])[Size("full", 6, 384)]
    sims = e @ e.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))


def ragged_batch(rows=40, width=48, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (rows, width), generator=g)
    lengths = torch.randint(2, width + 1, (rows,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("buckets", [0, 2, 5])
def test_length_buckets_give_the_same_embeddings_and_gradients(pooling, buckets, monkeypatch):
    import retrieval.encoder as modeling

    monkeypatch.setattr(modeling, "BUCKET_TOKENS", 500)  # auto (0): 40 x 48 tokens -> 4 sub-batches
    b = ragged_batch()
    grads = {}
    outs = {}
    for n in (1, buckets):
        enc = StarbucksEncoder(tiny_bert(layers=4, seed=1), pooling=pooling).train()
        enc.backbone.config.hidden_dropout_prob = 0.0
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        enc.length_buckets = n
        enc.packing = False  # length buckets split padded batches (packed ones have no padding to save)
        calls = []
        enc.layers[0].register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape))
        out = enc.embed(b, SIZES)
        sum(v.pow(2).sum() for v in out.values()).backward()
        outs[n] = {s: v.detach() for s, v in out.items()}
        grads[n] = [p.grad.clone() for p in enc.parameters() if p.grad is not None]
        expected = 1 if n == 1 else (4 if n == 0 else n)
        assert len(calls) == expected
        if n != 1:  # each sub-batch is cut to its own longest row (rounded up to 16), never wider
            assert sum(shape[0] for shape in calls) == 40 and max(shape[1] for shape in calls) == 48
            assert min(shape[1] for shape in calls) < 48
    for s in SIZES:
        assert_near(outs[buckets][s], outs[1][s], rel=1e-5)
    assert_all_near(grads[buckets], grads[1], rel=1e-5)


def test_tokenize_equals_the_tokenizers_own_padding():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    texts = ["a short one", "a much longer text about debian packages and their many dependencies " * 4, "x"]
    for max_length, multiple in [(32, 8), (196, 8), (20, None)]:
        got = tokenize(tok, texts, max_length, prefix="query: ", pad_to_multiple_of=multiple)
        want = tok(
            ["query: " + t for t in texts],
            max_length=max_length,
            truncation=True,
            padding=True,
            pad_to_multiple_of=multiple if multiple and max_length % multiple == 0 else None,
            return_tensors="pt",
        )
        assert set(got) == {"input_ids", "attention_mask"}
        torch.testing.assert_close(got["input_ids"], want["input_ids"])
        torch.testing.assert_close(got["attention_mask"], want["attention_mask"])
    tok.padding_side = "left"  # the encoder needs right padding (CLS at 0, positions from the first token)
    got = tokenize(tok, texts, 32)
    want = tok(
        texts,
        max_length=32,
        truncation=True,
        padding=True,
        pad_to_multiple_of=8,
        return_tensors="pt",
        padding_side="right",
    )
    torch.testing.assert_close(got["input_ids"], want["input_ids"])
    torch.testing.assert_close(got["attention_mask"], want["attention_mask"])
