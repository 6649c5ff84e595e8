"""DDP training with cross-device negatives: 2 gloo processes on CPU equal one process on the combined batch.

The test launches this file under `torchrun --nproc_per_node 2`; each rank (1) computes the
SRL loss and gradients of its half of a fixed batch through DDP and (2) runs `python -m train`'s
function for two steps with half the batch size (with and without gradient accumulation). The
parent checks both against one process.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_all_near, ragged_ids, run_two_gloo_ranks, tiny_bert
from retrieval.config import load_config
from retrieval.losses import CrossDeviceGather, InfoNCE, StarbucksLoss
from retrieval.checkpoint import load_encoder, read_meta, resolve_model_path
from retrieval.sizes import SizeList
from test_train import MINILM, collection, write_config  # noqa: F401  (a fixture)

SIZES = SizeList.from_config(["1x8", "2x16", "4x32"])
QUERIES, GROUP = 4, 3
RUNS = [("plain", 4, 1), ("accumulated", 2, 2)]  # name, queries per micro-batch (all ranks), grad_accum


def make_model_dir(directory: Path) -> Path:
    """A tiny BERT without dropout (ranks draw different dropout masks than one process would)."""
    from transformers import AutoTokenizer

    model = tiny_bert(layers=4, hidden=32, vocab=30522, seed=0)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(resolve_model_path(MINILM)).save_pretrained(directory)
    return directory


def combined_batch():
    """Queries `(4, 8)` and passages `(12, 12)` with some padding, fixed by a seed."""
    g = torch.Generator().manual_seed(3)
    return ragged_ids(QUERIES, 8, g, 1000, 30000), ragged_ids(QUERIES * GROUP, 12, g, 1000, 30000)


def half(batch: dict, rank: int, world: int) -> dict:
    n = len(batch["input_ids"]) // world
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def srl_loss(gather=None) -> StarbucksLoss:
    return StarbucksLoss(InfoNCE(0.5), SIZES, kl_weight=1.0, kl_temperature=2.0, gather=gather)


def worker(work: Path) -> None:
    """One rank under torchrun: the DDP loss and gradients, then the training runs of `RUNS`."""
    from accelerate import Accelerator

    from train.finetune import run_training
    from train.trainer import distributed_state

    torch.set_num_threads(1)
    state = distributed_state()
    rank, world = state.process_index, state.num_processes
    assert world == 2, "run under torchrun --nproc_per_node 2"
    accelerator = Accelerator(cpu=True)
    encoder, _, _ = load_encoder(str(work / "model"), "mean", False)
    ddp = accelerator.prepare(encoder)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    queries, passages = combined_batch()
    q, p = half(queries, rank, world), half(passages, rank, world)
    out = srl_loss(CrossDeviceGather(world, rank))(ddp(q, SIZES), ddp(p, SIZES))
    accelerator.backward(out.loss)
    if rank == 0:
        grads = {n: t.grad.clone() for n, t in encoder.named_parameters()}
        torch.save({"loss": out.terms["loss"].item(), "grads": grads}, work / "ddp.pt")
    for name, batch_size, accum in RUNS:
        run_training(
            load_config(
                work / "run.yaml",
                [
                    f"train.batch_size={batch_size // world}",
                    f"train.grad_accum={accum}",
                    f"output_dir={work / 'ddp' / name}",
                ],
            )
        )


def test_ddp_loss_gradients_and_training_equal_one_process(tmp_path, collection):  # noqa: F811 (the fixture)
    model_dir = make_model_dir(tmp_path / "model")
    config = write_config(
        tmp_path,
        model_dir,
        collection,
        max_steps=2,
        group_size=GROUP,
        save_steps=1,
        learning_rate=1e-4,
        weight_decay=0.01,
    )  # Adam magnifies float noise in ~0 gradients by lr
    (tmp_path / "run.yaml").write_text(config.read_text())
    run_two_gloo_ranks(__file__, str(tmp_path))

    # (1) loss and gradients of every parameter, against one process on the combined batch
    encoder, _, _ = load_encoder(str(model_dir), "mean", False)
    queries, passages = combined_batch()
    out = srl_loss()(encoder(queries, SIZES), encoder(passages, SIZES))
    out.loss.backward()
    ddp = torch.load(tmp_path / "ddp.pt")
    assert ddp["loss"] == pytest.approx(out.loss.item(), abs=1e-5)
    local_only = srl_loss()(encoder(half(queries, 0, 2), SIZES), encoder(half(passages, 0, 2), SIZES))
    assert abs(local_only.loss.item() - out.loss.item()) > 1e-3  # the gather matters
    assert_all_near(ddp["grads"], {name: p.grad for name, p in encoder.named_parameters()}, rel=1e-5)

    # (2) two training steps on 2 ranks, against one process on the same (combined) micro-batches
    from train.finetune import run_training

    for name, batch_size, accum in RUNS:
        run_training(
            load_config(
                config,
                [
                    f"train.batch_size={batch_size}",
                    f"train.grad_accum={accum}",
                    f"output_dir={tmp_path / 'single' / name}",
                ],
            )
        )
        a = load_file(tmp_path / "single" / name / "model" / "model.safetensors")
        b = load_file(tmp_path / "ddp" / name / "model" / "model.safetensors")
        assert_all_near(b, a, rel=1e-5)
    run = tmp_path / "ddp" / "plain"
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 2  # rank 0 logs, once per step
    assert read_meta(run / "model")["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(p.name for p in (run / "checkpoints" / "checkpoint-2" / "state").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
