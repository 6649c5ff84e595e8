"""The training loop shared by fine-tuning and SMAE pre-training, built on HF `accelerate`.

Why `accelerate` and not HF `Trainer`: a step here is "encode queries and passage groups at
the sizes this step visits, score every size, sum the terms", with per-size terms to log, a
model that saves as an HF directory plus `starbucks.json`, and a data position that must be a
pure function of the step for exact resume. `Trainer` would need its loss, collator, saving,
logging and resume overridden; `accelerate` gives the hard parts (DDP, bf16/fp16 autocast and
loss scaling, `save_state`/`load_state` for optimizer, scheduler and RNG, `skip_first_batches`)
and leaves the loop readable in one place.

Anything trainable plugs in as a `TrainTask` (model, dataset keyed by `(index, epoch)`,
collate, loss of a batch at a step, how to save the model, the fingerprint a resumed run must
match). Determinism: the data order is seeded per epoch and every micro-batch reseeds torch's
RNG from `(seed, step, micro-batch, rank)`, so dropout and sampling do not depend on history
and a resumed run takes exactly the steps an uninterrupted one would. Gradient accumulation is
explicit (`no_sync` on all but a step's last micro-batch), so a step is always exactly
`grad_accum` micro-batches and step <-> data position is plain arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json, atomic_write_text
from retrieval.lock import run_lock
from retrieval.checkpoint import read_meta
from retrieval.dropout import use_fast_dropout
from retrieval.losses import LossOutput
from train.checkpoint import Checkpoints, read_state, replace_dir, saving, staging_dir
from retrieval.seeds import derive_seed
from retrieval.settings import accelerate_precision, resolve_precision
from train.data import EpochSampler
from train.gradcache import cached_backward
from train.cost import RunCost

# train.* keys that may change between a run and its resume (they do not change the result).
BOOKKEEPING_KEYS = (
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "dataloader_workers",
    "resume",
    "gradient_checkpointing",
    "report_to",
)  # not length_buckets: sub-batches draw dropout in another order
LOG_FILE = "train_log.jsonl"
BEST_DIR = "best-model"  # train.keep_best: the best validated model so far, under the run directory


def config_fingerprint(cfg, **sections) -> dict:
    """What a resumed run must share with its checkpoint: seed, model, sizes, the `train` settings
    that shape the run (not `BOOKKEEPING_KEYS`), and the task's own `sections` (its data)."""
    from omegaconf import OmegaConf

    c = OmegaConf.to_container(cfg, resolve=True)
    train = {k: v for k, v in c["train"].items() if k not in BOOKKEEPING_KEYS}
    return {"seed": c["seed"], "model": c["model"], "sizes": c["sizes"], "train": train, **sections}


class TrainTask(Protocol):
    """What the loop trains. `compute_loss` runs under autocast; the loop handles the rest.

    A task that `train.grad_cache` can train also has `embedding_inputs(batch, step)` (the tokenised
    texts to embed by name, and the sizes of the step) and `embedding_loss(embeddings, sizes)` (the
    loss of `{name: {size: embeddings}}`); its `compute_loss` is `embedding_loss` of the model's
    embeddings of `embedding_inputs`."""

    name: str  # shown in the progress bar and the summary
    examples_name: str  # what `batch_examples` counts, e.g. "queries"
    model: nn.Module
    dataset: Dataset  # items keyed by `(index, epoch)`
    can_validate: bool  # has `validate(model)` (train.eval_steps)
    can_cache_gradients: bool  # has `embedding_inputs` and `embedding_loss` (train.grad_cache)

    def collate(self, items: list) -> dict: ...

    def compute_loss(self, model: nn.Module, batch: dict, step: int) -> LossOutput: ...

    def batch_examples(self, batch: dict) -> int: ...

    def save_model(self, model: nn.Module, directory: Path, step: int) -> None: ...

    def fingerprint(self) -> dict: ...

    def step_flops(self, batch: dict, step: int) -> int: ...  # model FLOPs of a micro-batch (train.flops)


@dataclass
class TrainSettings:
    """The loop's settings: the `train` section of a loaded config, plus the seed. The schema
    (`retrieval.schema`) states each key's default, type and range, and `load_config` checked them:
    no defaults and no re-checks here."""

    seed: int
    epochs: float
    max_steps: int | None
    batch_size: int
    grad_accum: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    scheduler: str
    max_grad_norm: float | None
    precision: str
    dropout_masks: str
    gradient_checkpointing: bool
    grad_cache: bool
    grad_cache_chunk: int
    save_steps: int
    save_total_limit: int | None
    logging_steps: int
    dataloader_workers: int
    resume: bool
    eval_steps: int | None
    eval_metric: str
    keep_best: str | None
    early_stopping_patience: int | None
    report_to: str

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        t = cfg.train
        names = [f for f in cls.__dataclass_fields__ if f != "seed"]
        settings = cls(seed=int(cfg.seed), **{f: t[f] for f in names})
        settings.check()
        return settings

    def check(self) -> None:
        """One clear line for what the schema cannot see: settings that need each other, a precision
        this machine lacks, a tracker whose package is missing."""
        mixed_precision(self.precision, torch.cuda.is_available())
        for key in ("keep_best", "early_stopping_patience"):
            if getattr(self, key) is not None and self.eval_steps is None:
                raise StarbucksError(f"train.{key} needs validation during training: set train.eval_steps")
        trackers(self.report_to)

    @property
    def best_key(self) -> str:
        """The validation metric a best model and early stopping follow."""
        return f"eval/{self.keep_best or 'avg'}/{self.eval_metric}"


def trackers(report_to) -> list[str]:
    """`train.report_to` as accelerate tracker names (`none`: no tracker); one line for an unknown
    tracker or one whose package is missing."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [n.strip() for n in str(report_to or "none").split(",") if n.strip() not in ("", "none")]
    known = [t for t in LoggerType.list() if t != "all"]
    available = {LoggerType(t).value for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise StarbucksError(f"train.report_to = {report_to!r}: {name!r} is not one of none, {', '.join(known)}")
        if name not in available:
            raise StarbucksError(
                f"train.report_to = {name} but its package is not installed; pip install {name} "
                "(or train.report_to=none)"
            )
    return names


def tracker_config(fingerprint: dict, prefix: str = "") -> dict:
    """A run's settings flattened to `section.key` -> bool/int/float/str (what trackers store)."""
    flat = {}
    for key, value in fingerprint.items():
        if isinstance(value, dict):
            flat.update(tracker_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


def validate(accelerator: Accelerator, task: TrainTask, model: nn.Module) -> dict[str, float]:
    """The task's validation metrics, computed on the main process and shared with every rank."""
    from accelerate.utils import broadcast_object_list

    metrics = [task.validate(accelerator.unwrap_model(model)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(metrics)
    return metrics[0]


@dataclass
class TrainResult:
    start_step: int
    steps: int  # the step count reached (== total steps when finished)
    seconds: float
    examples: int
    first_loss: float | None
    last_loss: float | None
    model_dir: Path
    checkpoint: Path
    best: "BestRecord | None" = None


@dataclass
class BestRecord:
    """The best validation so far under `key` (`eval/<keep_best or avg>/<metric>`), the validations
    since (early stopping), and whether the run stopped early; saved with each checkpoint."""

    key: str
    step: int | None = None
    score: float | None = None
    since: int = 0
    stopped: bool = False

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Count a validation; True when it sets a new best."""
        score = metrics[self.key]
        if self.score is None or score > self.score:
            self.step, self.score, self.since = step, score, 0
            return True
        self.since += 1
        return False


def distributed_state():
    """The process-group state (single process, `torchrun` or `accelerate launch`); gloo on CPU-only machines.

    Create it through this function (not a bare `PartialState()`) before anything else asks for it:
    the first creation decides whether a CPU-only run joins the process group.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def mixed_precision(precision: str, cuda: bool) -> str:
    """accelerate's `mixed_precision` for `train.precision` (auto: bf16 on a GPU that has it, else fp16;
    on the CPU bf16 where the chip has native bf16, else fp32: `retrieval.settings.resolve_precision`)."""
    device = torch.device("cuda" if cuda else "cpu")
    return accelerate_precision(resolve_precision(precision, device, "train.precision", "bf16", cpu_fp16=False))


def dropout_masks(setting: str, device: torch.device) -> str:
    """`train.dropout_masks` resolved: `numpy` (retrieval/dropout.py) on the CPU unless `torch` is asked
    for; PyTorch's everywhere else (the NumPy masks are CPU tensors). In the run's fingerprint."""
    return "numpy" if device.type == "cpu" and setting in ("auto", "numpy") else "torch"


def build_optimizer(model: nn.Module, settings: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases or LayerNorm); PyTorch's fused kernel on CUDA
    and on the CPU (one pass over the parameters instead of a dozen elementwise ops: on 2 cores 11 ms a
    step for MiniLM's 22.7M parameters against 60-140 ms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.learning_rate, fused=device.type in ("cuda", "cpu"))


def enable_gradient_checkpointing(model: nn.Module) -> None:
    from transformers import PreTrainedModel

    kwargs = {"use_reentrant": False}
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing:
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resumable_checkpoint(checkpoints: Checkpoints, fingerprint: dict) -> Path | None:
    """The newest complete checkpoint, if any; one clear line if it was made with other settings."""
    latest = checkpoints.latest()
    if latest is not None:
        diff = first_difference(read_state(latest)["fingerprint"], json.loads(json.dumps(fingerprint)))
        if diff:
            raise StarbucksError(
                f"{latest} was trained with other settings: {diff}; re-run with the same config to resume, "
                f"or add train.resume=false to start over"
            )
    return latest


def first_difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two nested dicts, or None."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} (checkpoint: {a!r}, now: {b!r})"
    return None


class TrainLog:
    """Windowed averages of the loss terms, written to `train_log.jsonl` on the main process.

    Each term is averaged over the steps that logged it (2DMSE visits different sizes per step).
    """

    def __init__(self, path: Path, start_step: int, main: bool):
        self.path = path
        self.main = main
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._truncate(start_step)

    def _truncate(self, step: int) -> None:
        """Keep the lines of steps <= `step` (a resumed run rewrites what came after)."""
        if not self.path.is_file():
            return
        if step == 0:
            self.path.unlink()
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def window(self, accelerator: Accelerator) -> dict:
        """The open window (sums averaged over the ranks, counts), for a checkpoint: a resumed run
        restores it, so its first log averages the same steps as the uninterrupted run's."""
        keys = sorted(self.sums)
        sums = [self.sums[k] for k in keys]
        if accelerator.num_processes > 1 and keys:
            sums = accelerator.reduce(torch.tensor(sums, device=accelerator.device), "mean").tolist()
        return {"sums": dict(zip(keys, sums)), "counts": {k: self.counts[k] for k in keys}}

    def restore(self, window: dict) -> None:
        self.sums, self.counts = dict(window["sums"]), dict(window["counts"])

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self, accelerator: Accelerator, record: dict) -> dict:
        """Average the window over its steps and the ranks, append one line, start a new window."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] / self.counts[k] for k in keys], device=accelerator.device)
        values = accelerator.reduce(values, "mean").tolist() if accelerator.num_processes > 1 else values.tolist()
        record = {**record, **dict(zip(keys, values))}
        self.write(record)
        self.sums, self.counts = {}, {}
        return record

    def write(self, record: dict) -> None:
        """Append one line (main process)."""
        if self.main:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def _postfix(record: dict, unit: str) -> dict:
    short = {"loss": f"{record['loss']:.4f}", f"{unit}/s": f"{record[unit + '_per_s']:.1f}"}
    short.update({k[3:]: f"{v:.3f}" for k, v in record.items() if k.startswith("ce/")})
    kl = [v for k, v in record.items() if k.startswith("kl/")]
    if kl:
        short["kl"] = f"{sum(kl) / len(kl):.4f}"
    return short


def fit(
    task: TrainTask,
    settings: TrainSettings,
    run_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    accelerator: Accelerator | None = None,
) -> TrainResult:
    """Train `task.model`; checkpoint under `run_dir/checkpoints`, write the final model to `model_dir`.

    Re-running with the same settings resumes from the newest complete checkpoint. The main process
    holds a lock on `run_dir` meanwhile: a second training of the same run stops with one line.
    """
    main = distributed_state().is_main_process
    with run_lock(run_dir, f"training {task.name}", ".lock-train") if main else contextlib.nullcontext():
        return _fit(task, settings, run_dir, model_dir, accelerator)


def _fit(
    task: TrainTask,
    settings: TrainSettings,
    run_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    accelerator: Accelerator | None,
) -> TrainResult:
    check_task(task, settings)
    return TrainingRun(task, settings, Path(run_dir), Path(model_dir), accelerator).train()


def check_task(task: TrainTask, settings: TrainSettings) -> None:
    """Settings the task cannot honour: one line."""
    if settings.eval_steps and not task.can_validate:
        raise StarbucksError(f"train.eval_steps: {task.name} has no validation; remove train.eval_steps")
    if settings.grad_cache and not task.can_cache_gradients:
        raise StarbucksError(
            f"train.grad_cache applies to fine-tuning (srl, 2dmse, separate, full), not {task.name}; "
            "remove it (use train.gradient_checkpointing or train.grad_accum to save memory)"
        )


def build_accelerator(settings: TrainSettings, run_dir: Path) -> Accelerator:
    """The run's `Accelerator`: device, mixed precision, trackers logging under `run_dir/logs`."""
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs"))
    return Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision(settings.precision, cuda),
        log_with=trackers(settings.report_to) or None,
        project_config=project,
    )


class TrainingRun:
    """One invocation of a run: set up (model, optimizer, data, schedule, the resumed state), then
    `train()` steps, validates, logs and checkpoints, and writes the final model."""

    def __init__(
        self, task: TrainTask, settings: TrainSettings, run_dir: Path, model_dir: Path, accelerator: Accelerator | None
    ):
        self.task, self.settings, self.run_dir, self.model_dir = task, settings, run_dir, model_dir
        self.accelerator = accelerator = accelerator or build_accelerator(settings, run_dir)
        self.main = accelerator.is_main_process
        self.checkpoints = Checkpoints(run_dir / "checkpoints", settings.save_total_limit)
        fingerprint = task.fingerprint()
        loop = {k: v for k, v in vars(settings).items() if k not in BOOKKEEPING_KEYS and k != "seed"}
        loop["precision"] = mixed_precision(settings.precision, torch.cuda.is_available())  # `auto` resolved
        loop["dropout_masks"] = dropout_masks(settings.dropout_masks, self.accelerator.device)
        self.fingerprint = {**fingerprint, "seed": settings.seed, "train": {**fingerprint.get("train", {}), **loop}}
        self.latest = resumable_checkpoint(self.checkpoints, self.fingerprint) if settings.resume else None
        self._clear_leftovers()
        self._prepare()
        self._resume()

    def _clear_leftovers(self) -> None:
        """Staging directories of a killed run (and every checkpoint when not resuming)."""
        if self.main:
            self.checkpoints.clear_staging()
            for leftover in self.model_dir.parent.glob(f".tmp-{self.model_dir.name}.*"):
                shutil.rmtree(leftover, ignore_errors=True)
            if not self.settings.resume:
                self.checkpoints.remove_all()
        self.accelerator.wait_for_everyone()

    def _prepare(self) -> None:
        """Model, optimizer, data loader and scheduler, prepared by accelerate; the step count."""
        from transformers import get_scheduler

        settings, accelerator, task = self.settings, self.accelerator, self.task
        model = task.model
        if settings.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model.to(accelerator.device)
        if dropout_masks(settings.dropout_masks, accelerator.device) == "numpy":
            use_fast_dropout(model)  # masks from NumPy's generator (retrieval/dropout.py)
        optimizer = build_optimizer(model, settings, accelerator.device)
        self.sampler = EpochSampler(len(task.dataset), settings.seed)
        loader = DataLoader(
            task.dataset,
            batch_size=settings.batch_size,
            sampler=self.sampler,
            collate_fn=task.collate,
            drop_last=True,
            num_workers=settings.dataloader_workers,
        )
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        self.steps_per_epoch = len(self.loader) // settings.grad_accum
        if self.steps_per_epoch == 0:
            need = settings.batch_size * settings.grad_accum * accelerator.num_processes
            raise StarbucksError(
                f"{len(task.dataset)} training examples make no full step of {need} "
                f"(batch_size x grad_accum x processes); lower train.batch_size or add data"
            )
        self.total = settings.max_steps or max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        self.scheduler = get_scheduler(
            settings.scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(settings.warmup_ratio * self.total),
            num_training_steps=self.total,
        )
        accelerator.register_for_checkpointing(self.scheduler)

    def _resume(self) -> None:
        """The step to start at, the log window, the best-model record and the cost so far."""
        accelerator, latest, run_dir = self.accelerator, self.latest, self.run_dir
        self.start, state = 0, {}
        if latest is not None:
            accelerator.load_state(str(latest / "state"))
            state = read_state(latest)
            self.start = int(state["step"])
            if self.main:
                tqdm.write(f"resuming from {latest} (step {self.start} of {self.total})")
        self.log = TrainLog(run_dir / LOG_FILE, self.start, self.main)
        if "log_window" in state:
            self.log.restore(state["log_window"])
        self.best = BestRecord(**state["best"]) if state.get("best") else BestRecord(self.settings.best_key)
        saved_best = read_meta(run_dir / BEST_DIR) if (run_dir / BEST_DIR).is_dir() else None
        if self.main and saved_best is not None and saved_best.get("step") != self.best.step:
            shutil.rmtree(
                run_dir / BEST_DIR
            )  # saved after the checkpoint resumed from: the record does not describe it
        if accelerator.log_with:
            accelerator.init_trackers(self.task.name, config=tracker_config(self.fingerprint))
        self.cost = RunCost(accelerator, latest)  # wall time, device, steps, FLOPs: train_summary.json

    # ------------------------------------------------------------ during the loop

    def save_checkpoint(self, step: int) -> Path:
        accelerator, settings = self.accelerator, self.settings
        staging = self.checkpoints.staging(step)
        with saving(staging):  # a full disk: one line, the checkpoints before stay
            accelerator.save_state(str(staging / "state"))
            window = self.log.window(accelerator)
            spent = self.cost.record(step, time.perf_counter() - self.started)
            if self.main:
                self.cost.save(staging, spent)
                self.task.save_model(accelerator.unwrap_model(self.model), staging / "model", step)
                atomic_write_json(
                    staging / "trainer_state.json",
                    {
                        "step": step,
                        "epoch": step / self.steps_per_epoch,
                        "total_steps": self.total,
                        "steps_per_epoch": self.steps_per_epoch,
                        "fingerprint": self.fingerprint,
                        "log_window": window,
                        "best": vars(self.best) if settings.eval_steps else None,
                    },
                )
        accelerator.wait_for_everyone()
        final = self.checkpoints.commit(staging, step) if self.main else self.checkpoints.root / f"checkpoint-{step}"
        accelerator.wait_for_everyone()
        return final

    def write_log(self, done: int) -> None:
        """Flush the open log window at step `done`; keeps the first and last logged losses."""
        elapsed = time.perf_counter() - self.started
        record = self.log.flush(
            self.accelerator,
            {
                "step": done,
                "epoch": round(done / self.steps_per_epoch, 4),
                "lr": self.scheduler.get_last_lr()[0],
                f"{self.task.examples_name}_per_s": self.examples / elapsed,
                "elapsed_s": round(elapsed, 2),
            },
        )
        self.bar.set_postfix(_postfix(record, self.task.examples_name), refresh=False)
        self.accelerator.log(record, step=done)
        self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = record["loss"]

    def validate(self, done: int) -> bool:
        """Validate at step `done`, keep a new best model, decide on early stopping; whether there is a
        new kept best."""
        settings, best = self.settings, self.best
        metrics = validate(self.accelerator, self.task, self.model)
        self.log.write({"step": done, **metrics})
        self.accelerator.log(metrics, step=done)
        new_best = best.update(done, metrics) and bool(settings.keep_best)
        if new_best and self.main:
            staging = staging_dir(self.run_dir / BEST_DIR)
            with saving(staging):
                self.task.save_model(self.accelerator.unwrap_model(self.model), staging, done)
            replace_dir(staging, self.run_dir / BEST_DIR)
        patience = settings.early_stopping_patience
        best.stopped = bool(patience) and best.since >= patience
        if self.main:
            tqdm.write(
                f"step {done}: {best.key} {metrics[best.key]:.4f} (best {best.score:.4f} at step {best.step})"
                + (f"; no new best in {best.since} validations: stopping" if best.stopped else "")
            )
        return new_best

    def _batches(self, step: int, batches):
        """The micro-batch iterator at `step`: a new epoch's, or the resumed position's."""
        if batches is not None and step % self.steps_per_epoch:
            return batches
        epoch, offset = divmod(step, self.steps_per_epoch)
        self.loader.set_epoch(epoch)  # accelerate passes it on to the sampler at each iteration
        self.sampler.set_epoch(epoch)
        skip = offset * self.settings.grad_accum
        return iter(self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader)

    # ------------------------------------------------------------ the run

    def train(self) -> TrainResult:
        settings, accelerator, best, total = self.settings, self.accelerator, self.best, self.total
        self.bar = tqdm(
            total=total,
            initial=self.start,
            desc=f"train {self.task.name}",
            unit="step",
            disable=not self.main,
            dynamic_ncols=True,
        )
        self.started = time.perf_counter()
        self.examples, self.first_loss, self.last_loss = 0, None, None
        checkpoint, reached, batches = self.latest, self.start, None
        for step in range(self.start, self.start if best.stopped else total):  # a stopped run stays stopped
            batches = self._batches(step, batches)
            step_terms, step_examples = accumulate_gradients(
                accelerator, self.task, self.model, batches, step, settings, self.cost
            )
            self.examples += step_examples
            if settings.max_grad_norm:
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm)
                step_terms["grad_norm"] = float(grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.log.add(step_terms)
            done = reached = step + 1
            self.bar.update(1)
            logged = done % settings.logging_steps == 0 or done == total
            if logged:
                self.write_log(done)
            new_best = (
                bool(settings.eval_steps) and (done % settings.eval_steps == 0 or done == total) and self.validate(done)
            )
            if best.stopped and not logged:  # the open log window of a run that stops early
                self.write_log(done)
            # a new kept best is checkpointed at once, so that a resume finds the record that describes best-model/
            if best.stopped or new_best or done % settings.save_steps == 0 or done == total:
                checkpoint = self.save_checkpoint(done)
            if best.stopped:
                break
        self.bar.close()
        for tracker in accelerator.trackers:  # not end_training(): it would also end the caller's process group
            tracker.finish()
        self.save_final_model(reached)
        seconds = time.perf_counter() - self.started
        spent = self.cost.record(reached, seconds if self.start < reached else 0.0)
        result = TrainResult(
            self.start,
            reached,
            seconds,
            self.examples,
            self.first_loss,
            self.last_loss,
            self.model_dir,
            checkpoint,
            best if settings.eval_steps else None,
        )
        if self.main:
            self.cost.write_summary(self.run_dir, spent, task=self.task.name)
            print(summary_line(self.task, result), flush=True)
        return result

    def save_final_model(self, reached: int) -> None:
        """The run's model: the kept best (`train.keep_best`) or the last step's."""
        if self.main:
            staging = staging_dir(self.model_dir)
            best_dir = self.run_dir / BEST_DIR
            with saving(staging):
                if self.settings.keep_best and best_dir.is_dir():  # its starbucks.json names its step
                    shutil.copytree(best_dir, staging, dirs_exist_ok=True)
                else:
                    if self.settings.keep_best:
                        tqdm.write(
                            f"train: no validated best model in {best_dir} (dropped on resume: it was "
                            f"saved after the checkpoint resumed from); the model is the last step's"
                        )
                    self.task.save_model(self.accelerator.unwrap_model(self.model), staging, reached)
            replace_dir(staging, self.model_dir)
        self.accelerator.wait_for_everyone()


def accumulate_gradients(
    accelerator: Accelerator,
    task: TrainTask,
    model: nn.Module,
    batches,
    step: int,
    settings: TrainSettings,
    cost: RunCost,
) -> tuple[dict[str, float], int]:
    """Backpropagate the step's `grad_accum` micro-batches (DDP syncs on the last); their mean terms and
    examples. Their model FLOPs go to `cost`."""
    terms: dict[str, float] = {}
    examples = 0
    for micro in range(settings.grad_accum):
        batch = next(batches)
        torch.manual_seed(derive_seed(settings.seed, "step", step, micro, accelerator.process_index))
        last = micro == settings.grad_accum - 1
        if settings.grad_cache:
            inputs, sizes = task.embedding_inputs(batch, step)
            out = cached_backward(
                accelerator,
                model,
                inputs,
                sizes,
                lambda emb: task.embedding_loss(emb, sizes),
                settings.grad_cache_chunk,
                1 / settings.grad_accum,
                sync=last,
            )
        else:
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                with accelerator.autocast():
                    out = task.compute_loss(model, batch, step)
                accelerator.backward(out.loss / settings.grad_accum)
        values = torch.stack([v.float() for v in out.terms.values()]).tolist()  # one device sync
        for k, v in zip(out.terms, values):
            terms[k] = terms.get(k, 0.0) + v / settings.grad_accum
        examples += task.batch_examples(batch) * accelerator.num_processes
        cost.add(task.step_flops(batch, step))
    return terms, examples


def summary_line(task: TrainTask, r: TrainResult) -> str:
    if r.start_step == r.steps:
        return f"{task.name}: already trained ({r.steps} steps); model: {r.model_dir}"
    rate = r.examples / r.seconds if r.seconds else 0.0
    loss = f"loss {r.first_loss:.4f} -> {r.last_loss:.4f}, " if r.first_loss is not None else ""
    resumed = f" (resumed at {r.start_step})" if r.start_step else ""
    if r.best is not None and r.best.step is not None:
        stopped = "stopped early; " if r.best.stopped else ""
        resumed += f" ({stopped}best {r.best.key} {r.best.score:.4f} at step {r.best.step})"
    return (
        f"{task.name}: {r.steps} steps{resumed}, {loss}{r.examples} {task.examples_name} in {r.seconds:.1f} s "
        f"({rate:.1f} {task.examples_name}/s, {r.seconds / (r.steps - r.start_step):.2f} s/step); "
        f"model: {r.model_dir}"
    )
