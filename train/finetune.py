"""Fine-tuning a Starbucks retriever: `run_training(cfg)` (what `python -m train` calls).

Checks what a user can get wrong before loading weights (settings, method, sizes against the
model's shape, negatives per group), builds the encoder, the loss and the data, and hands them
to the shared loop (`train.trainer.fit`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import OmegaConf
from torch import Tensor

from retrieval.config import experiment_paths, sizes_of
from retrieval.data import TrainGroup, hold_out, load_train_groups
from retrieval.errors import StarbucksError
from retrieval.settings import whole_number
from retrieval.losses import CrossDeviceGather, InfoNCE, LossOutput, StarbucksLoss
from retrieval.checkpoint import load_encoder, model_shape, save_encoder
from retrieval.encoder import StarbucksEncoder
from retrieval.packing import use_packing
from retrieval.sizes import Size
from train.data import GroupCollator, GroupDataset
from train.flops import retrieval_step_flops
from train.methods import MethodPlan, plan_method
from train.smae import check_pretrained_pooling
from train.trainer import TrainResult, TrainSettings, config_fingerprint, distributed_state, fit, mixed_precision
from train.validation import Validator, keep_best_key


class RetrievalTask:
    """Queries and passage groups -> sub-size embeddings of the sizes the step visits -> `StarbucksLoss`."""

    examples_name = "queries"
    can_validate = True  # train.eval_steps (the validator is built on the main process only)
    can_cache_gradients = True

    def __init__(
        self,
        encoder: StarbucksEncoder,
        tokenizer,
        groups: Sequence[TrainGroup],
        plan: MethodPlan,
        loss: StarbucksLoss,
        cfg,
        validator: Validator | None = None,
    ):
        self.name = plan.name
        self.validator = validator  # train.eval_steps (built on the main process only)
        self.model = encoder
        self.tokenizer = tokenizer
        self.plan = plan
        self.loss = loss
        m = cfg.model
        self.dataset = GroupDataset(groups, int(cfg.train.group_size), int(cfg.seed))
        self.collate = GroupCollator(
            tokenizer, m.query_max_length, m.passage_max_length, m.query_prefix, m.passage_prefix
        )
        self.meta = {
            "sizes": plan.saved_sizes.to_config(),
            "method": plan.name,
            "base_model": m.name_or_path,
            "query_max_length": m.query_max_length,
            "passage_max_length": m.passage_max_length,
            "query_prefix": m.query_prefix,
            "passage_prefix": m.passage_prefix,
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        data = OmegaConf.to_container(cfg.data, resolve=True)
        self._fingerprint = config_fingerprint(cfg, data={k: v for k, v in data.items() if k != "eval_splits"})
        # `auto` values resolved: they differ by device, and packing or precision change a run's numbers
        cuda = torch.cuda.is_available()
        self._fingerprint["train"]["length_buckets"] = encoder.length_buckets
        self._fingerprint["train"]["precision"] = mixed_precision(str(cfg.train.precision), cuda)
        self._fingerprint["model"]["packing"] = use_packing(
            encoder.packing, encoder.backbone, torch.device("cuda" if cuda else "cpu")
        )

    def embedding_inputs(self, batch: dict, step: int) -> tuple[dict[str, dict], list[Size]]:
        """The texts a step embeds and the sizes it visits (gradient caching embeds them chunk by chunk)."""
        return {"queries": batch["queries"], "passages": batch["passages"]}, self.plan.schedule.at(step)

    def embedding_loss(self, embeddings: dict[str, dict[Size, Tensor]], sizes: list[Size]) -> LossOutput:
        return self.loss(embeddings["queries"], embeddings["passages"], sizes)

    def compute_loss(self, model, batch: dict, step: int) -> LossOutput:
        inputs, sizes = self.embedding_inputs(batch, step)
        return self.embedding_loss({name: model(texts, sizes) for name, texts in inputs.items()}, sizes)

    def validate(self, model: StarbucksEncoder) -> dict[str, float]:
        return self.validator(model)

    def batch_examples(self, batch: dict) -> int:
        return len(batch["queries"]["input_ids"])

    def step_flops(self, batch: dict, step: int) -> int:
        world = self.loss.gather.world_size if self.loss.gather is not None else 1
        return retrieval_step_flops(
            self.model.config,
            batch["queries"]["attention_mask"],
            batch["passages"]["attention_mask"],
            self.plan.schedule.at(step),
            world,
        )

    def save_model(self, model: StarbucksEncoder, directory: Path, step: int) -> None:
        save_encoder(model, directory, self.tokenizer, {**self.meta, "step": step})

    def fingerprint(self) -> dict:
        return self._fingerprint


def check_groups(groups: Sequence[TrainGroup], group_size: int, source: str) -> int:
    """Every group needs hard negatives for the `group_size - 1` a step takes: a group with none is
    an error; one with fewer is padded by repeating its own (as Tevatron does). Returns how many are padded."""
    need = group_size - 1  # train.group_size, checked (>= 1) by the schema
    if need == 0:
        return 0
    empty = [g for g in groups if not g.negatives]
    if empty:
        raise StarbucksError(
            f"train.group_size = {group_size} needs hard negatives, but {len(empty)} of {len(groups)} groups in "
            f"{source} have none (query {empty[0].query_id!r}); set train.group_size=1 or give them negatives"
        )
    short = [g for g in groups if len(g.negatives) < need]
    if short:
        fewest = min(short, key=lambda g: len(g.negatives))
        print(
            f"train: {len(short)} of {len(groups)} groups have fewer than {need} hard negatives (fewest: "
            f"{fewest.query_id!r} with {len(fewest.negatives)}); their negatives repeat to fill the group",
            file=sys.stderr,
        )
    return len(short)


def length_buckets(value) -> int:
    """`train.length_buckets`: a whole number >= 1, or auto (on a GPU 0: one length-sorted sub-batch
    per `BUCKET_TOKENS` padded tokens of a batch; 1 on the CPU)."""
    value = whole_number(value, "train.length_buckets", 1, auto=True)
    if value == "auto":
        import torch

        return 0 if torch.cuda.is_available() else 1
    return value


def run_training(cfg) -> TrainResult:
    """Train the model `cfg` describes; returns where the model went and what the run did."""
    settings = TrainSettings.from_config(cfg)
    t, m = cfg.train, cfg.model
    sizes = sizes_of(cfg)
    buckets = length_buckets(t.length_buckets)
    num_layers, hidden = model_shape(m.name_or_path)
    check_pretrained_pooling(m.name_or_path, m.pooling, m.allow_pooling_change)
    plan = plan_method(t, sizes, num_layers, hidden, settings.seed, m.name_or_path)
    base = InfoNCE(t.temperature)
    weights = list(t.size_weights) if t.size_weights is not None else None
    state = distributed_state()
    cross_device = state.num_processes > 1 and t.cross_device_negatives
    gather = CrossDeviceGather(state.num_processes, state.process_index) if cross_device else None
    loss = StarbucksLoss(base, plan.saved_sizes, t.kl_weight, t.kl_temperature, weights, plan.reduction, gather)

    with state.main_process_first():  # the main process downloads and caches hub data first
        groups = load_train_groups(
            cfg.data.train, cfg.data.train_corpus or cfg.data.corpus, cfg.data.train_split, cfg.data.max_train_groups
        )
    heldout = None
    if t.holdout_queries:
        groups, heldout = hold_out(groups, int(t.holdout_queries), cfg.data.train)
    check_groups(groups, t.group_size, cfg.data.train)

    encoder, tokenizer, _ = load_encoder(m.name_or_path, m.pooling, m.normalize, m.attn_implementation)
    if plan.truncate_to:
        encoder.truncate_(plan.truncate_to)
    encoder.length_buckets = buckets
    encoder.packing = m.packing
    validator = None
    if settings.eval_steps:
        if settings.keep_best:
            keep_best_key(settings.keep_best, plan.saved_sizes, settings.eval_metric)
        Validator.check_settings(cfg)  # on every rank
        if state.is_main_process:
            validator = Validator(cfg, plan.saved_sizes, tokenizer, settings.seed, heldout)
    task = RetrievalTask(encoder, tokenizer, groups, plan, loss, cfg, validator)
    paths = experiment_paths(cfg)
    return fit(task, settings, paths.root, paths.model)
