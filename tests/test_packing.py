"""Packed (unpadded) batches: the same embeddings, gradients and training loss as padded batches."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from conftest import assert_all_near, assert_near, tiny_bert
from retrieval.errors import StarbucksError
from retrieval.encoder import StarbucksEncoder
from retrieval.packing import GROUP_TEXTS, GROUP_WASTE, PackedBatch, group_texts, packed_attention, pick_kernel
from retrieval.sizes import Size, SizeList
from test_encode import make_config, stored, workspace  # noqa: F401 (workspace: a fixture)
from test_train import collection, log_lines, train, write_config  # noqa: F401 (collection: a fixture)

SIZES = SizeList([Size("a", 1, 8), Size("b", 2, 16), Size("c", 3, 8), Size("d", 4, 32)])


def ragged_batch(rows=9, width=24, seed=0):
    """Right-padded rows of lengths 1..width (one of each extreme), random ids."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[0], lengths[1] = 1, width
    ids = torch.randint(5, 1000, (rows, width), generator=g)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def encoder(packing, pooling="cls", normalize=False, dropout=None, seed=1):
    enc = StarbucksEncoder(tiny_bert(layers=4, seed=seed), pooling=pooling, normalize=normalize)
    if dropout is not None:
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
        enc.config.attention_probs_dropout_prob = dropout
    enc.packing = packing
    return enc


def test_packed_batch_layout():
    b = {
        "input_ids": torch.tensor([[7, 8, 9, 0], [5, 0, 0, 0], [1, 2, 3, 4]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
    }
    p = PackedBatch.from_padded(b)
    assert p.input_ids.tolist() == [7, 8, 9, 5, 1, 2, 3, 4]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]  # restart for each text
    assert p.token_type_ids.tolist() == [0] * 8
    assert p.cu_seqlens.tolist() == [0, 3, 4, 8] and p.max_length == 4
    states = torch.arange(8.0).unsqueeze(1)
    assert p.pool(states, "cls").squeeze(1).tolist() == [0.0, 3.0, 4.0]
    assert p.pool(states, "mean").squeeze(1).tolist() == [1.0, 3.0, 5.5]


def test_buckets_are_few_and_close_above():
    from retrieval.packing import bucket

    assert [bucket(t) for t in (1, 256, 257, 320, 321, 1000, 1024, 1025)] == [256, 256, 320, 320, 384, 1024, 1024, 1280]
    shapes = {bucket(t) for t in range(1, 100_001)}
    assert len(shapes) <= 40 and all(t <= bucket(t) <= max(256, 1.25 * t) for t in range(1, 5000))


def test_bucketed_layout_adds_filler_texts_no_longer_than_the_longest():
    b = {
        "input_ids": torch.tensor([[7, 8, 9, 0], [5, 0, 0, 0], [1, 2, 3, 4]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]),
    }
    p = PackedBatch.from_padded(b, buckets=True)
    assert len(p.input_ids) == 256 and p.tokens == 8 and p.texts == 3
    assert p.lengths[:3].tolist() == [3, 1, 4] and p.lengths[3:].max() <= 4 and int(p.lengths.sum()) == 256
    assert p.max_length == 32 and len(set(p.flat_index.tolist())) == 256  # distinct places in the grid
    states = torch.arange(256.0).unsqueeze(1)
    assert p.pool(states, "mean").squeeze(1).tolist() == [1.0, 3.0, 5.5]  # filler never pooled


def test_attention_groups_cover_every_text_once_within_the_bounds():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        lengths = torch.randint(1, 200, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
        groups = group_texts(lengths)
        assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
        for group in groups:
            ls = [lengths[i] for i in group]
            assert ls == sorted(ls, reverse=True) and len(ls) <= GROUP_TEXTS
            grid, pairs = len(ls) * ls[0] ** 2, sum(x * x for x in ls)
            assert len(ls) == 1 or grid <= (1 + GROUP_WASTE) * pairs
    assert group_texts([5] * 20) == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    assert group_texts([10, 3, 10, 9]) == [[0, 2, 3], [1]]  # 3 x 10^2 <= 1.2 (100 + 100 + 81); 3 tokens apart


def test_grouped_attention_equals_one_grid(monkeypatch):
    """The CPU's grouped attention gives the one-grid reference's outputs and gradients."""
    import retrieval.packing as packing

    b = ragged_batch(rows=23, width=40, seed=7)
    p = PackedBatch.from_padded(b)
    groups, order = p.attention_groups
    assert len(groups) > 2 and sorted(order.tolist()) == list(range(p.tokens))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(p.tokens, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    outs, grads = {}, {}
    for name, fn in (("grid", packing._padded_attention), ("grouped", packing._grouped_attention)):
        out = fn(q, k, v, p, 8**-0.5, 0.0)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs[name], grads[name] = out.detach(), [x.grad.clone() for x in (q, k, v)]
        for x in (q, k, v):
            x.grad = None
    assert_near(outs["grouped"], outs["grid"], rel=1e-5)
    assert_all_near(grads["grouped"], grads["grid"], rel=1e-5)
    # the packed forward on the CPU takes the grouped path
    seen = []
    monkeypatch.setattr(packing, "_grouped_attention", lambda *a: seen.append(1) or packing._padded_attention(*a[:6]))
    with torch.no_grad():
        encoder(True).embed(b, SIZES)
    assert len(seen) == max(s.layers for s in SIZES)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bucketed_packing_gives_the_same_embeddings_and_gradients(pooling):
    b = ragged_batch(seed=4)
    out, grads = {}, {}
    for buckets in (False, True):
        enc = encoder(True, pooling, dropout=0.0).train()
        enc.pack_buckets = buckets
        widths = []
        enc.layers[0].register_forward_hook(lambda _m, inputs, _o: widths.append(inputs[0].shape[1]))
        emb = enc.embed(b, SIZES)
        sum(v.pow(2).sum() for v in emb.values()).backward()
        out[buckets] = {s: v.detach() for s, v in emb.items()}
        grads[buckets] = [p.grad for p in enc.parameters() if p.grad is not None]
        assert widths == [256 if buckets else int(b["attention_mask"].sum())]
    for s in SIZES:
        assert_near(out[True][s], out[False][s], rel=1e-5)
    assert_all_near(grads[True], grads[False], rel=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_packed_equals_padded_for_every_size(pooling, normalize):
    b = ragged_batch()
    with torch.no_grad():
        padded = encoder(False, pooling, normalize).embed(b, SIZES)
        enc = encoder(True, pooling, normalize)
        widths = []
        enc.layers[0].register_forward_hook(lambda _m, inputs, _o: widths.append(tuple(inputs[0].shape)))
        packed = enc.embed(b, SIZES)
    assert widths == [(1, int(b["attention_mask"].sum()), 32)]  # one sequence of the real tokens only
    for s in SIZES:
        assert packed[s].shape == (9, s.dim)
        assert_near(packed[s], padded[s], rel=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_packed_equals_padded_under_bf16_autocast(pooling):
    b = ragged_batch(seed=3)
    out = {}
    for packing in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out[packing] = encoder(packing, pooling).embed(b, SIZES)
    for s in SIZES:
        assert out[True][s].dtype == out[False][s].dtype
        torch.testing.assert_close(out[True][s].float(), out[False][s].float(), rtol=3e-2, atol=3e-2)


def test_packed_runs_only_the_needed_layers():
    enc = encoder(True)
    calls = []
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
    with torch.no_grad():
        enc.embed(ragged_batch(), [Size("s", 2, 8)])
    assert calls == [0, 1]


@pytest.mark.parametrize("pooling,checkpointing", [("cls", False), ("mean", False), ("mean", True)])
def test_packed_gives_the_same_gradients(pooling, checkpointing):
    b = ragged_batch(seed=5)
    grads = {}
    for packing in (False, True):
        enc = encoder(packing, pooling, dropout=0.0).train()
        if checkpointing:  # the backward pass re-runs each layer, outside the packed forward
            enc.backbone.activation_checkpointing_enable()
        out = enc.embed(b, SIZES)
        sum((v * torch.linspace(-1, 1, v.shape[1])).sum() + v.pow(2).sum() for v in out.values()).backward()
        grads[packing] = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 10
    assert_all_near(grads[True], grads[False], rel=1e-5)


def test_auto_packs_on_the_cpu_and_where_a_varlen_kernel_exists():
    from retrieval.packing import fast_kernel_available, use_packing

    enc = encoder("auto")
    assert pick_kernel(torch.device("cpu"), 0.0) == "padded"  # the grid attention: packing pays off without a kernel
    assert use_packing("auto", enc.backbone, torch.device("cpu")) is True
    assert use_packing(True, enc.backbone, torch.device("cpu")) is True
    assert use_packing(False, enc.backbone, torch.device("cpu")) is False
    assert use_packing("auto", enc.backbone, torch.device("cuda")) is fast_kernel_available(torch.device("cuda"))
    for bad in ("sometimes", 1, None):
        with pytest.raises(StarbucksError, match="model.packing"):
            enc.packing = bad
    enc.packing = "false"
    assert enc.packing is False


def test_unsupported_backbone_runs_padded_with_a_note():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=1000, dim=32, n_layers=2, n_heads=4, hidden_dim=64)).eval()
    enc = StarbucksEncoder(model, "mean")
    b = ragged_batch()
    with torch.no_grad():
        padded = enc.embed(b, [Size("s", 2, 32)])
        enc.packing = True
        with pytest.warns(UserWarning, match="running padded"):
            packed = enc.embed(b, [Size("s", 2, 32)])
    torch.testing.assert_close(packed[Size("s", 2, 32)], padded[Size("s", 2, 32)], rtol=0, atol=0)


def test_packed_attention_is_only_for_packed_batches():
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(RuntimeError, match="packed"):
        packed_attention(None, q, q, q, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length kernels need CUDA")
@pytest.mark.parametrize("kernel", ["varlen", "flash_attn"])
def test_cuda_varlen_kernel_equals_the_padded_reference(kernel, monkeypatch):
    import retrieval.packing as packing

    if kernel == "flash_attn" and not packing.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if kernel == "varlen" and not packing.torch_varlen_available():
        pytest.skip("torch.nn.attention.varlen needs PyTorch >= 2.10")
    b = {k: v.cuda() for k, v in ragged_batch(rows=16, width=64).items()}
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    enc = StarbucksEncoder(BertModel(config).eval().cuda().half(), "mean")
    sizes = [Size("s", 2, 64)]
    with torch.no_grad():
        padded = enc.embed(b, sizes)[sizes[0]]
        enc.packing = True
        monkeypatch.setattr(packing, "pick_kernel", lambda device, dropout, dtype: kernel)
        packed = enc.embed(b, sizes)[sizes[0]]
    torch.testing.assert_close(packed.float(), padded.float(), rtol=2e-2, atol=2e-3)


@pytest.fixture(scope="module")
def dropout_free_model(tmp_path_factory):
    """A tiny BERT without dropout (so packed and padded steps draw nothing random), MiniLM's tokenizer."""
    from transformers import AutoTokenizer

    from retrieval.checkpoint import resolve_model_path

    d = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    model = tiny_bert(layers=4, hidden=32, vocab=30522, seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")).save_pretrained(d)
    return d


@pytest.mark.parametrize("pooling,extra", [("cls", []), ("mean", []), ("mean", ["train.gradient_checkpointing=true"])])
def test_training_with_packing_gives_the_same_losses(
    tmp_path,
    dropout_free_model,
    collection,
    pooling,  # noqa: F811
    extra,
    monkeypatch,
):
    import retrieval.encoder as modeling

    packed_calls = []
    original = modeling.packed_hidden_states
    monkeypatch.setattr(modeling, "packed_hidden_states", lambda *a: packed_calls.append(1) or original(*a))
    losses = {}
    for packing in (False, True):
        name = f"packing-{packing}"
        cfg = write_config(tmp_path, dropout_free_model, collection, name=name, max_steps=2)
        train(cfg, f"model.packing={str(packing).lower()}", f"model.pooling={pooling}", *extra)
        losses[packing] = [line["loss"] for line in log_lines(tmp_path / name)]
        assert (len(packed_calls) > 0) == packing  # queries and passages of both steps ran packed
    assert len(losses[True]) == 2
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_encode_stage_with_packing_writes_the_same_embeddings(tmp_path, workspace, monkeypatch):  # noqa: F811
    import retrieval.encoder as modeling
    from encode import encode_collection

    packed_calls = []
    original = modeling.packed_hidden_states
    monkeypatch.setattr(modeling, "packed_hidden_states", lambda *a: packed_calls.append(1) or original(*a))
    for packing in ("false", "true"):
        encode_collection(make_config(workspace, tmp_path / packing, f"model.packing={packing}"), progress=False)
        assert bool(packed_calls) == (packing == "true")
    for size in ("a", "b", "4x32"):
        ids, padded = stored(tmp_path / "false", size)
        ids2, packed = stored(tmp_path / "true", size)
        assert ids == ids2
        np.testing.assert_allclose(
            packed.astype(np.float32), padded.astype(np.float32), rtol=2e-3, atol=1e-5
        )  # fp16 ulp
