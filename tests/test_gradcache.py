"""Gradient caching (`train.grad_cache`): the same loss and gradients as one differentiable pass,
for every method, both poolings and length buckets, with dropout on; under 2 gloo processes with
cross-device negatives; in the training loop; and less activation memory with smaller chunks.

The reference pass is written out here without `train.gradcache`: seed, embed the same chunks
with gradients, one loss, one backward. With one chunk per input it is the uncached training
step itself (`RetrievalTask.compute_loss`); with smaller chunks it draws the same dropout masks
as the cached step's first (no-grad) pass, which the re-runs must replay.
"""

import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from conftest import assert_all_near, ragged_ids, run_two_gloo_ranks, tiny_bert
from retrieval.config import load_config
from retrieval.losses import CrossDeviceGather, InfoNCE, StarbucksLoss
from retrieval.encoder import StarbucksEncoder
from retrieval.sizes import SizeList
from test_ddp import make_model_dir
from test_train import collection, tiny_model, train, write_config  # noqa: F401  (fixtures)
from train.gradcache import cached_backward
from train.methods import plan_method

SIZES = SizeList.from_config(["1x8", "2x16", "4x32"])
QUERIES, GROUP = 4, 3


def random_batch(seed: int, queries: int = QUERIES):
    """Queries `(q, 8)` and passages `(q * GROUP, 12)` of random ids with ragged padding."""
    g = torch.Generator().manual_seed(seed)
    return {"queries": ragged_ids(queries, 8, g), "passages": ragged_ids(queries * GROUP, 12, g)}


def method_setup(method: str, pooling: str, buckets: int, dropout: float = 0.1):
    """A tiny BERT encoder (in train mode) with the method's sizes of step 3 and its loss."""
    overrides = [f"train.method={method}"] + (["train.size=2x16"] if method == "separate" else [])
    plan = plan_method(load_config(None, overrides).train, SIZES, 4, 32, seed=0)
    backbone = tiny_bert(layers=4, hidden=32, seed=0)
    for module in backbone.modules():
        if isinstance(module, torch.nn.Dropout):  # hidden and attention dropout (BERT's default 0.1)
            module.p = dropout
    encoder = StarbucksEncoder(backbone, pooling, normalize=True)  # cosine at temperature 0.05: gradients ~1
    if plan.truncate_to:
        encoder.truncate_(plan.truncate_to)
    encoder.length_buckets = buckets
    encoder.train()
    return encoder, plan.schedule.at(3), starbucks_loss(plan.saved_sizes, plan.reduction)


def starbucks_loss(sizes, reduction="mean", gather=None) -> StarbucksLoss:
    return StarbucksLoss(InfoNCE(0.05), sizes, 1.0, 2.0, reduction=reduction, gather=gather)


def reference(encoder, batch, sizes, loss, chunk: int, seed: int):
    """Loss and gradients of one differentiable pass over `chunk`-row slices of each input."""
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    embedded = {}
    for name, texts in batch.items():
        parts = [
            encoder({k: v[i : i + chunk] for k, v in texts.items()}, sizes)
            for i in range(0, len(texts["input_ids"]), chunk)
        ]
        embedded[name] = {s: torch.cat([p[s] for p in parts]) for s in sizes}
    out = loss(embedded["queries"], embedded["passages"], sizes)
    out.loss.backward()
    return out.loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def cached(encoder, batch, sizes, loss, chunk: int, seed: int, accelerator=None):
    encoder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = cached_backward(
        accelerator or Accelerator(cpu=True),
        encoder,
        batch,
        sizes,
        lambda e: loss(e["queries"], e["passages"], sizes),
        chunk,
    )
    return out.loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters()}


def assert_same(a, b, tol=1e-5):
    """Equal losses and gradients up to float summation order (within `tol` of the gradient's norm)."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, abs=tol)
    assert_all_near(grads_a, grads_b, rel=tol)


@pytest.mark.parametrize("buckets", [1, 2])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("method", ["srl", "2dmse", "separate", "full"])
def test_cached_step_equals_the_plain_step(method, pooling, buckets):
    encoder, sizes, loss = method_setup(method, pooling, buckets)
    batch = random_batch(0, queries=16)  # 16 queries, 48 passages: length buckets need >= 8 rows per chunk
    # dropout is on: two seeds give different embeddings, so equal gradients need the replayed masks
    torch.manual_seed(1)
    first = encoder(batch["queries"], sizes)[sizes[0]]
    torch.manual_seed(2)
    assert not torch.allclose(first, encoder(batch["queries"], sizes)[sizes[0]])
    # one chunk per input: exactly the uncached training step
    assert_same(cached(encoder, batch, sizes, loss, 1000, seed=5), reference(encoder, batch, sizes, loss, 1000, 5))
    # 16-text chunks (3 for the passages, 2 sub-batches each with length buckets): the same chunks in one graph
    assert_same(cached(encoder, batch, sizes, loss, 16, seed=5), reference(encoder, batch, sizes, loss, 16, 5))


def test_cached_step_under_bf16_autocast():
    """accelerate's bf16 autocast: embeddings (the cached leaves) in bf16, the loss in fp32. The loss is
    the same to the last bit; gradients agree to bf16's precision (8 bits of mantissa: ~1% after a
    few roundings in a different order)."""
    from accelerate.state import AcceleratorState

    encoder, sizes, loss = method_setup("2dmse", "cls", 1)
    batch = random_batch(0, queries=8)
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = reference(encoder, batch, sizes, loss, 1000, seed=3)
        assert_same(cached(encoder, batch, sizes, loss, 1000, seed=3, accelerator=accelerator), plain, tol=2e-2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = reference(encoder, batch, sizes, loss, 4, seed=3)
        assert_same(cached(encoder, batch, sizes, loss, 4, seed=3, accelerator=accelerator), plain, tol=2e-2)
        fp32 = reference(encoder, batch, sizes, loss, 4, seed=3)
        changed = sum(float((fp32[1][n] - g).norm()) ** 2 for n, g in plain[1].items()) ** 0.5
        assert changed > 1e-3 * sum(float(g.norm()) ** 2 for g in plain[1].values()) ** 0.5  # autocast was on
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_peak_activation_memory_falls_with_the_chunk_size():
    """Bytes of the tensors autograd saves for backward, alive at once (saved-tensor accounting)."""
    encoder, sizes, loss = method_setup("srl", "cls", 1)
    batch = random_batch(0, queries=8)

    class Saved:
        live = peak = 0

        def __init__(self, t):
            self.t, self.bytes = t, t.untyped_storage().nbytes()
            Saved.live += self.bytes
            Saved.peak = max(Saved.peak, Saved.live)

        def __del__(self):
            Saved.live -= self.bytes

    def peak_of(step) -> int:
        Saved.live = Saved.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
            step()
        return Saved.peak

    plain = peak_of(lambda: reference(encoder, batch, sizes, loss, 1000, seed=0))
    peaks = [peak_of(lambda c=c: cached(encoder, batch, sizes, loss, c, seed=0)) for c in (24, 8, 4, 2)]
    assert plain > peaks[0] > peaks[1] > peaks[2] > peaks[3]
    assert peaks[3] < plain / 5  # 2 texts of 32 at a time (the cached loss's own graph is small)


def test_two_cached_training_steps_give_the_uncached_weights(tmp_path, tiny_model, collection):  # noqa: F811
    """Through `python -m train`'s function: with dropout on and one chunk per input the runs are the
    same; with 2-text chunks they are too when dropout is off (the chunks draw other masks)."""
    settings = dict(max_steps=2, grad_accum=2, save_steps=1, learning_rate=1e-4, weight_decay=0.01)
    runs = {"plain": {}, "cached": {"grad_cache": True, "grad_cache_chunk": 1000}}
    for name, extra in runs.items():
        train(write_config(tmp_path, tiny_model, collection, name=name, **settings, **extra))
    assert_same_weights(tmp_path / "plain", tmp_path / "cached", rel=1e-6)
    a = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], v) for k, v in load_file(tiny_model / "model.safetensors").items() if k in a)


def assert_same_weights(a: Path, b: Path, rel=1e-5) -> None:
    a, b = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert_all_near(b, a, rel=rel)


def test_cached_training_with_small_chunks_and_without_dropout(tmp_path, collection):  # noqa: F811
    model_dir = make_model_dir(tmp_path / "model")
    settings = dict(max_steps=2, save_steps=1, learning_rate=1e-4, weight_decay=0.01, method="2dmse")
    train(write_config(tmp_path, model_dir, collection, name="plain", **settings))
    train(write_config(tmp_path, model_dir, collection, name="cached", grad_cache=True, grad_cache_chunk=2, **settings))
    assert_same_weights(tmp_path / "plain", tmp_path / "cached")


# ---------------------------------------------------------------- 2 gloo processes


def worker(work: Path) -> None:
    """One rank: the cached step of its half of the batch through DDP, cross-device negatives on."""
    from train.finetune import run_training
    from train.trainer import distributed_state

    torch.set_num_threads(1)
    state = distributed_state()
    rank, world = state.process_index, state.num_processes
    accelerator = Accelerator(cpu=True)
    encoder, sizes, _ = method_setup("srl", "mean", 1, dropout=0.0)  # ranks would draw other dropout masks
    loss = starbucks_loss(SIZES, gather=CrossDeviceGather(world, rank))
    ddp = accelerator.prepare(encoder)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    batch = random_batch(0)
    half = {
        name: {k: v[rank * len(v) // world : (rank + 1) * len(v) // world] for k, v in texts.items()}
        for name, texts in batch.items()
    }
    out = cached_backward(accelerator, ddp, half, sizes, lambda e: loss(e["queries"], e["passages"], sizes), chunk=2)
    if rank == 0:
        torch.save(
            {"loss": out.terms["loss"].item(), "grads": {n: p.grad for n, p in encoder.named_parameters()}},
            work / "ddp.pt",
        )
    # two training steps of 2 micro-batches, 2-text chunks: each rank 1 query (3 passages) per micro-batch
    run_training(
        load_config(
            work / "run.yaml",
            [
                "train.batch_size=1",
                "train.grad_accum=2",
                "train.grad_cache=true",
                "train.grad_cache_chunk=2",
                f"output_dir={work / 'ddp'}",
            ],
        )
    )


def test_cached_step_under_two_gloo_processes_with_cross_device_negatives(tmp_path, collection):  # noqa: F811
    config = write_config(
        tmp_path,
        make_model_dir(tmp_path / "model"),
        collection,
        max_steps=2,
        save_steps=1,
        learning_rate=1e-4,
        weight_decay=0.01,
    )
    (tmp_path / "run.yaml").write_text(config.read_text())
    run_two_gloo_ranks(__file__, str(tmp_path))
    encoder, sizes, loss = method_setup("srl", "mean", 1, dropout=0.0)
    loss_value, grads = reference(encoder, random_batch(0), sizes, loss, 1000, seed=0)  # one process, whole batch
    ddp = torch.load(tmp_path / "ddp.pt")
    assert_same((ddp["loss"], ddp["grads"]), (loss_value, grads))
    half = {name: {k: v[: len(v) // 2] for k, v in texts.items()} for name, texts in random_batch(0).items()}
    assert abs(reference(encoder, half, sizes, loss, 1000, seed=0)[0] - loss_value) > 1e-3  # the gather matters
    # the 2-rank cached run against one uncached process on the combined micro-batches (2 queries each)
    train(config, "train.batch_size=2", "train.grad_accum=2", f"output_dir={tmp_path / 'single'}")
    assert_same_weights(tmp_path / "single", tmp_path / "ddp")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
