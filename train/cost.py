"""The cost record of a run: wall time, device, steps and model FLOPs (`train.flops`), carried over
a resume through the checkpoint (`cost.json`) and written next to the model as `train_summary.json`
(format: `retrieval.cost`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from retrieval.cost import TRAIN_SUMMARY
from retrieval.io import atomic_write_json

CHECKPOINT_FILE = "cost.json"


class RunCost:
    """Wall time, steps and FLOPs of a run, summed over the ranks and over resumed invocations."""

    def __init__(self, accelerator, checkpoint: Path | None):
        self.accelerator = accelerator
        before = {}
        if checkpoint is not None and (checkpoint / CHECKPOINT_FILE).is_file():
            before = json.loads((checkpoint / CHECKPOINT_FILE).read_text())
        self.seconds_before = float(before.get("seconds", 0.0))
        self.flops_before = int(before.get("flops", 0))
        self.local_flops = 0  # this rank, this invocation

    def add(self, flops: int) -> None:
        self.local_flops += int(flops)

    def record(self, step: int, seconds: float) -> dict:
        """The totals so far, `seconds` of this invocation's loop included (a collective call under
        DDP: every rank must call it)."""
        local = torch.tensor([self.local_flops], dtype=torch.float64, device=self.accelerator.device)
        flops = self.accelerator.reduce(local, "sum") if self.accelerator.num_processes > 1 else local
        device = self.accelerator.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return {
            "steps": step,
            "seconds": round(self.seconds_before + seconds, 3),
            "flops": self.flops_before + int(flops.item()),
            "device": name,
            "processes": self.accelerator.num_processes,
        }

    def save(self, directory: Path, record: dict) -> None:
        """Into a checkpoint being staged (main process)."""
        atomic_write_json(directory / CHECKPOINT_FILE, record)

    def write_summary(self, run_dir: Path, record: dict, **extra) -> None:
        """`train_summary.json` next to the model (main process)."""
        atomic_write_json(run_dir / TRAIN_SUMMARY, {**record, **extra})
