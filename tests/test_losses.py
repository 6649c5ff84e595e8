"""InfoNCE, KL alignment and StarbucksLoss against hand computations."""

import math

import pytest
import torch

from retrieval.errors import StarbucksError
from retrieval.losses import InfoNCE, StarbucksLoss, kl_divergence
from retrieval.sizes import Size

from conftest import assert_near

SUB, FULL = Size("sub", 1, 2), Size("full", 2, 3)

# 2 queries, groups of 2 passages (positive of query i at column 2 i).
Q_FULL = [[1.0, 0.5, -1.0], [0.0, 2.0, 1.0]]
P_FULL = [[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.0, 2.0]]
Q_SUB = [[0.5, -0.5], [1.0, 1.0]]
P_SUB = [[1.0, 1.0], [0.0, 1.0], [2.0, 0.0], [0.5, -1.0]]


def dot_rows(q, p):
    return [[sum(a * b for a, b in zip(qi, pj)) for pj in p] for qi in q]


def hand_ce(logits, group):
    """Mean over queries of -log softmax(row)[positive]."""
    total = 0.0
    for i, row in enumerate(logits):
        total += math.log(sum(math.exp(x) for x in row)) - row[i * group]
    return total / len(logits)


def hand_kl(teacher, student, temperature):
    """Mean over rows of sum_j P_t log(P_t / P_s), softmaxes at `temperature`."""
    total = 0.0
    for t_row, s_row in zip(teacher, student):
        zt = sum(math.exp(x / temperature) for x in t_row)
        zs = sum(math.exp(x / temperature) for x in s_row)
        pt = [math.exp(x / temperature) / zt for x in t_row]
        ps = [math.exp(x / temperature) / zs for x in s_row]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(teacher)


def leaves():
    return {
        name: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for name, v in dict(qf=Q_FULL, pf=P_FULL, qs=Q_SUB, ps=P_SUB).items()
    }


def test_infonce_equals_hand_cross_entropy():
    loss = InfoNCE(temperature=0.5)
    q, p = torch.tensor(Q_FULL), torch.tensor(P_FULL)
    logits = loss.logits(q, p)
    expected_logits = [[x / 0.5 for x in row] for row in dot_rows(Q_FULL, P_FULL)]
    torch.testing.assert_close(logits, torch.tensor(expected_logits))
    assert loss(logits).item() == pytest.approx(hand_ce(expected_logits, group=2), rel=1e-6)


@pytest.mark.parametrize("kl_weight,kl_temperature", [(1.0, 1.0), (0.5, 2.0)])
def test_srl_loss_equals_hand_computation(kl_weight, kl_temperature):
    t = leaves()
    fn = StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_weight=kl_weight, kl_temperature=kl_temperature)
    out = fn({SUB: t["qs"], FULL: t["qf"]}, {SUB: t["ps"], FULL: t["pf"]})

    full_logits, sub_logits = dot_rows(Q_FULL, P_FULL), dot_rows(Q_SUB, P_SUB)
    ce_full, ce_sub = hand_ce(full_logits, 2), hand_ce(sub_logits, 2)
    kl_sub = hand_kl(full_logits, sub_logits, kl_temperature)
    expected = (ce_sub + ce_full) / 2 + kl_weight * (kl_sub + 0.0) / 2  # the teacher's own KL is 0
    assert out.loss.item() == pytest.approx(expected, rel=1e-9)
    assert out.terms["ce/full"].item() == pytest.approx(ce_full, rel=1e-9)
    assert out.terms["ce/sub"].item() == pytest.approx(ce_sub, rel=1e-9)
    assert out.terms["kl/sub"].item() == pytest.approx(kl_sub, rel=1e-9)
    assert "kl/full" not in out.terms


def test_kl_gives_no_gradient_to_the_teacher():
    t = leaves()
    fn = StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_weight=3.0)
    fn({SUB: t["qs"], FULL: t["qf"]}, {SUB: t["ps"], FULL: t["pf"]}).loss.backward()

    # The full size's gradient is that of its own CE term only (/2: the mean over sizes).
    r = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    (InfoNCE(1.0)(InfoNCE(1.0).logits(r["qf"], r["pf"])) / 2).backward()
    assert_near(t["qf"].grad, r["qf"].grad, rel=1e-5)
    assert_near(t["pf"].grad, r["pf"].grad, rel=1e-5)
    # ... while the sub size does get the KL gradient.
    s = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}
    sub_logits = s["qs"] @ s["ps"].T
    ce_only = torch.autograd.grad(InfoNCE(1.0)(sub_logits) / 2, s["qs"], retain_graph=True)[0]
    ((InfoNCE(1.0)(sub_logits) + 3.0 * kl_divergence(s["qf"] @ s["pf"].T, sub_logits)) / 2).backward()
    assert_near(t["qs"].grad, s["qs"].grad, rel=1e-5)
    assert not torch.allclose(t["qs"].grad, ce_only)


def test_size_weights_and_sum_reduction():
    t = leaves()
    q, p = {SUB: t["qs"], FULL: t["qf"]}, {SUB: t["ps"], FULL: t["pf"]}
    full_logits, sub_logits = dot_rows(Q_FULL, P_FULL), dot_rows(Q_SUB, P_SUB)
    ce_full, ce_sub, kl = hand_ce(full_logits, 2), hand_ce(sub_logits, 2), hand_kl(full_logits, sub_logits, 1.0)
    weighted = StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_weight=1.0, size_weights=[0.25, 2.0])(q, p)
    assert weighted.loss.item() == pytest.approx((0.25 * (ce_sub + kl) + 2.0 * ce_full) / 2, rel=1e-9)
    summed = StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_weight=1.0, reduction="sum")(q, p)
    assert summed.loss.item() == pytest.approx(ce_sub + kl + ce_full, rel=1e-9)


def test_visited_sizes_and_teacher_follow_the_call():
    t = leaves()
    mid = Size("mid", 1, 3)
    fn = StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_weight=1.0)
    out = fn({SUB: t["qs"], mid: t["qf"]}, {SUB: t["ps"], mid: t["pf"]}, sizes=[SUB, mid])
    assert set(out.terms) == {"ce/sub", "ce/mid", "kl/sub", "loss"}  # mid is the largest visited: the teacher


def test_bad_loss_settings_are_clear_errors():
    with pytest.raises(StarbucksError, match="size_weights"):
        StarbucksLoss(InfoNCE(1.0), [SUB, FULL], size_weights=[1.0])
    with pytest.raises(StarbucksError, match="temperature"):
        InfoNCE(0.0)
    with pytest.raises(StarbucksError, match="kl_temperature"):
        StarbucksLoss(InfoNCE(1.0), [SUB, FULL], kl_temperature=-1)
