"""CPU dropout with NumPy-drawn masks (`retrieval.dropout`) and the packed attention's dropout."""

import numpy as np
import pytest
import torch

from conftest import assert_all_near, assert_near, tiny_bert
from retrieval.dropout import LEVELS, Dropout, dropout, keep_mask, use_fast_dropout
from test_train import collection, tiny_model, train, write_config  # noqa: F401 (fixtures)


def test_masks_keep_the_stated_share_and_the_expectation():
    torch.manual_seed(0)
    keep, scale = keep_mask((1000, 1000), 0.1)
    dropped = round(0.1 * LEVELS) / LEVELS
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    share = keep.float().mean().item()
    assert abs(share - (1 - dropped)) < 5 * np.sqrt(dropped * (1 - dropped) / 1e6)  # 5 standard errors
    assert scale == pytest.approx(1 / (1 - dropped), rel=1e-12)
    x = torch.full((2000, 500), 3.0)
    assert dropout(x, 0.1).mean().item() == pytest.approx(3.0, rel=2e-3)  # unbiased: E[out] = x
    assert torch.unique(dropout(x, 0.25)).tolist() == [0.0, 4.0]  # kept values x / (1 - 1/4)


def test_masks_follow_torchs_generator():
    torch.manual_seed(7)
    a, _ = keep_mask((64, 64), 0.1)
    b, _ = keep_mask((64, 64), 0.1)
    torch.manual_seed(7)
    c, _ = keep_mask((64, 64), 0.1)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_dropout_module_and_function_edges():
    x = torch.randn(4, 8, requires_grad=True)
    layer = Dropout(0.5)
    assert (
        torch.equal(layer.eval()(x), x) and torch.equal(dropout(x, 0.0), x) and torch.equal(dropout(x, 0.3, False), x)
    )
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    torch.manual_seed(1)
    out = layer.train()(x)
    out.sum().backward()
    torch.manual_seed(1)
    keep, scale = keep_mask(x.shape, 0.5)
    assert torch.equal(out.detach(), x.detach() * keep * scale)
    assert torch.equal(x.grad, keep.float() * scale)  # the gradient goes through the kept places only


def test_use_fast_dropout_replaces_every_plain_dropout_and_keeps_the_weights():
    model = tiny_bert(layers=2, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = sum(type(m) is torch.nn.Dropout for m in model.modules())
    assert plain > 0 and use_fast_dropout(model) == plain
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert all(isinstance(m, Dropout) for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert_all_near(model.state_dict(), state, rel=0.0)


def test_packed_attention_dropout_is_the_math_path_with_those_masks():
    """Grouped packed attention with dropout: fp32 softmax(q k^T * s) on each group's grid, its
    probabilities dropped by `keep_mask`'s masks in group order, then times v."""
    import retrieval.packing as packing
    from retrieval.packing import PackedBatch
    from test_packing import ragged_batch

    p = PackedBatch.from_padded(ragged_batch(rows=13, width=20, seed=2))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(p.tokens, 2, 4, generator=g) for _ in range(3))
    torch.manual_seed(11)
    out = packing._grouped_attention(q, k, v, p, 0.5, 0.2, numpy_masks=True)
    torch.manual_seed(11)
    expected = torch.empty_like(q)
    groups, _ = p.attention_groups
    starts = p.cu_seqlens.tolist()
    for group in groups:
        keep, scale = keep_mask((group.texts, 2, group.length, group.length), 0.2)
        rows = group.tokens.tolist()
        at = 0
        for t in range(group.texts):  # text by text, from its tokens' places
            n = int(p.lengths[[i for i in range(p.segments) if starts[i] == rows[at]][0]])
            tok = group.tokens[at : at + n]
            qt, kt, vt = (x[tok].transpose(0, 1) for x in (q, k, v))  # (heads, n, d)
            probs = torch.softmax(qt @ kt.transpose(1, 2) * 0.5, -1) * keep[t, :, :n, :n] * scale
            expected[tok] = (probs @ vt).transpose(0, 1)
            at += n
    assert_near(out, expected, rel=1e-6)
    torch.manual_seed(11)
    assert_near(packing._grouped_attention(q, k, v, p, 0.5, 0.0), packing._padded_attention(q, k, v, p, 0.5, 0.0))


def test_checkpointed_layers_redraw_the_same_masks():
    """Under gradient checkpointing a layer runs again in the backward pass: the same dropout masks,
    so the same gradients as without checkpointing."""
    from test_packing import SIZES, encoder, ragged_batch

    b = ragged_batch(seed=5)
    grads = {}
    for checkpointing in (False, True):
        enc = encoder(True, "mean", dropout=0.1).train()
        assert use_fast_dropout(enc) > 0
        if checkpointing:
            enc.backbone.activation_checkpointing_enable()
        torch.manual_seed(4)
        emb = enc.embed(b, SIZES)
        sum(x.pow(2).sum() for x in emb.values()).backward()
        grads[checkpointing] = [p.grad for p in enc.parameters() if p.grad is not None]
    assert_all_near(grads[True], grads[False], rel=1e-5)


def test_cpu_training_draws_its_dropout_masks_here(tmp_path, tiny_model, collection, monkeypatch):  # noqa: F811
    import retrieval.dropout as fast

    drawn = []
    real = fast.keep_mask
    monkeypatch.setattr(fast, "keep_mask", lambda shape, p: drawn.append(p) or real(shape, p))
    train(write_config(tmp_path, tiny_model, collection, max_steps=1), "model.packing=true")
    assert drawn and set(drawn) == {0.1}  # the hidden states' and attention's dropout (tiny_bert: 0.1)


def test_dropout_masks_torch_draws_none_here_and_is_part_of_the_fingerprint(
    tmp_path,
    tiny_model,
    collection,
    monkeypatch,  # noqa: F811
):
    import retrieval.dropout as fast
    from retrieval.errors import StarbucksError

    drawn = []
    real = fast.keep_mask
    monkeypatch.setattr(fast, "keep_mask", lambda shape, p: drawn.append(p) or real(shape, p))
    config = write_config(tmp_path, tiny_model, collection, max_steps=2, save_steps=1)
    train(config, "model.packing=true", "train.dropout_masks=torch", "train.max_steps=1")
    assert drawn == []
    with pytest.raises(StarbucksError, match="dropout_masks"):  # resuming with the other masks is refused
        train(config, "model.packing=true", "train.dropout_masks=auto")
