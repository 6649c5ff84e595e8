"""Model FLOPs of a training step: a hand count, and torch's own FLOP counter on real steps."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_bert
from test_train import collection, tiny_model, train, write_config  # noqa: F401 (fixtures)
from retrieval.losses import InfoNCE, StarbucksLoss
from retrieval.encoder import StarbucksEncoder
from retrieval.sizes import Size, SizeList
from train.flops import encoder_flops, head_warmup_flops, layer_flops, retrieval_step_flops, smae_step_flops


def mask(*lengths, width=None):
    width = width or max(lengths)
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_layer_flops_equal_a_hand_count():
    # H = 8, I = 16, sequences of 3 and 5 real tokens (padded to 7: padding does not count)
    # projections: Q, K, V, O: 4 x 2 x 8 tokens x 8 x 8 = 4096; feed-forward: 2 x 2 x 8 x 8 x 16 = 4096
    # attention: (QK^T and AV) 2 x 2 x (3^2 + 5^2) x 8 = 1088
    assert layer_flops([3, 5], 8, 16) == 4096 + 4096 + 1088
    config = tiny_bert(layers=2, hidden=8).config
    config.intermediate_size = 16
    assert encoder_flops([3, 5], 2, config) == 2 * 9280


def test_retrieval_step_equals_a_hand_count():
    config = tiny_bert(layers=4, hidden=8).config  # intermediate 16
    sizes = [Size("a", 1, 2), Size("b", 3, 4)]  # deepest visited: 3 layers (early exit)
    q, p = mask(2, 4, width=6), mask(3, 3, 5, 1)
    # one layer: queries 2 x 6 x (4 x 64 + 2 x 128) + 4 x (4 + 16) x 8 = 6144 + 640 = 6784
    #            passages 2 x 12 x 512 + 4 x (9 + 9 + 25 + 1) x 8 = 12288 + 1408 = 13696
    # scores (2 queries x 4 passages): 2 x 2 x 4 x (2 + 4) = 96; all of it x 3 (forward + backward)
    assert retrieval_step_flops(config, q, p, sizes) == 3 * (3 * (6784 + 13696) + 96)
    # cross-device negatives over 2 ranks: every rank scores 4 queries x 8 passages
    assert retrieval_step_flops(config, q, p, sizes, world=2) == 3 * (3 * (6784 + 13696) + 4 * 96)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_retrieval_step_equals_torchs_flop_counter(pooling):
    # unpadded batches (torch counts the padded products; our count is of the real tokens)
    encoder = StarbucksEncoder(tiny_bert(layers=4, hidden=32).train(), pooling=pooling)
    sizes = SizeList([Size("a", 1, 8), Size("b", 2, 16), Size("c", 4, 32)])
    loss = StarbucksLoss(InfoNCE(0.5), sizes, kl_weight=1.0)
    g = torch.Generator().manual_seed(0)
    queries = {"input_ids": torch.randint(5, 1000, (3, 7), generator=g), "attention_mask": mask(7, 7, 7)}
    passages = {"input_ids": torch.randint(5, 1000, (6, 11), generator=g), "attention_mask": mask(*[11] * 6)}
    for visited in (list(sizes), [sizes[0], sizes[1]]):  # all sizes; an early exit at layer 2

        def step():
            loss(encoder(queries, visited), encoder(passages, visited), visited).loss.backward()

        expected = retrieval_step_flops(encoder.config, queries["attention_mask"], passages["attention_mask"], visited)
        assert counted(step) == expected


def test_smae_step_equals_torchs_flop_counter():
    from test_smae import tiny_mlm
    from train.smae import SMAE

    sizes = SizeList([Size("s1", 1, 8), Size("s2", 2, 16), Size("full", 3, 32)])
    model = SMAE(tiny_mlm(vocab=500, layers=3), sizes, decoder_layers=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (4, 12), generator=g)
    labels = torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, -100)
    decoder_labels = torch.where(torch.rand(4, 12, generator=g) < 0.5, ids, -100)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "decoder_input_ids": ids,
        "decoder_labels": decoder_labels,
    }
    assert counted(lambda: model(batch).loss.backward()) == smae_step_flops(model.encoder.config, batch, sizes, 1)


def test_head_warmup_step_equals_torchs_flop_counter():
    from test_smae import tiny_mlm
    from train.pretrain import HeadWarmup
    from train.smae import SMAE

    model = SMAE(tiny_mlm(vocab=500, layers=3), SizeList([Size("a", 1, 8), Size("full", 3, 32)]))
    head = {id(p) for p in model.head_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)  # as warm_up_head freezes them
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 500, (4, 12), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(torch.rand(4, 12, generator=g) < 0.3, ids, -100),
    }
    warmup = HeadWarmup(model)
    assert counted(lambda: warmup(batch).loss.backward()) == head_warmup_flops(model.encoder.config, batch)


def test_estimate_of_a_finetuning_run_is_close_to_what_it_records(tmp_path, tiny_model, collection):
    from retrieval.config import load_config
    from retrieval.cost import read_train_summary
    from train.estimate import estimate_training

    config = write_config(tmp_path, tiny_model, collection, max_steps=4)
    estimate = estimate_training(load_config(config))
    train(config)
    recorded = read_train_summary(tmp_path / "run")
    assert estimate["steps"] == recorded["steps"] == 4
    assert estimate["flops"] == estimate["steps"] * estimate["flops_per_step"]
    assert 0.8 < estimate["flops"] / recorded["flops"] < 1.25  # other batches of the same data
