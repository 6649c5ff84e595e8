"""What a training run will cost before it runs (the experiment's dry run, `--estimate`): steps and
model FLOPs counted from the real data with `train.flops`' formulas."""

from __future__ import annotations

import functools
import itertools
import math

import torch

from retrieval.errors import StarbucksError
from train.flops import head_warmup_flops, retrieval_step_flops, smae_step_flops

__all__ = ["estimate_training"]  # what the experiment's dry run may call

SAMPLE_BATCHES = 8  # batches an estimate tokenises


@functools.lru_cache(maxsize=4)
def _groups(source: str, corpus: str, split: str, max_groups):
    from retrieval.data import load_train_groups

    return load_train_groups(source, corpus, split, max_groups)


def estimate_training(cfg) -> dict:
    """What a training run of `cfg` will cost, before it runs: `{steps, flops, flops_per_step}` on one
    process. Fine-tuning: the real collation of `SAMPLE_BATCHES` batches drawn as the run draws them;
    SMAE: full windows with the configured mask ratios, the window count from a sample of the texts' tokens."""
    from transformers import AutoConfig, AutoTokenizer

    from retrieval.config import sizes_of
    from retrieval.checkpoint import resolve_model_path

    t, m = cfg.train, cfg.model
    path = resolve_model_path(m.name_or_path)
    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    sizes = sizes_of(cfg)
    batch = int(t.batch_size) * int(t.grad_accum)
    if t.method == "smae":
        from train.pretrain import text_sources
        from train.masking import iter_texts

        p = cfg.pretrain
        stream = (
            text
            for s in text_sources(cfg)
            for text in iter_texts(s["source"], s["text_field"], s["hf_config"], s["hf_split"])
        )
        texts = list(itertools.islice(stream, p.max_texts))  # no more of the sources than the run reads
        sample = texts[:: max(1, len(texts) // 2000)]
        per_text = sum(len(ids) - 1 for ids in tokenizer(sample, add_special_tokens=True)["input_ids"]) / len(sample)
        tokens = per_text * len(texts) if p.max_tokens is None else min(per_text * len(texts), p.max_tokens)
        windows = int(tokens // (int(p.max_length) - 2))
        length = int(p.max_length)
        ones = torch.ones(batch, length, dtype=torch.long)
        shape = {"attention_mask": ones}
        for key, ratio in (("labels", p.enc_mask_ratio), ("decoder_labels", p.dec_mask_ratio)):
            shape[key] = torch.where(torch.rand(batch, length) < ratio, ones, torch.full_like(ones, -100))
        deepest = min(sizes.largest.layers, int(config.num_hidden_layers))
        config.num_hidden_layers = deepest
        per_step = smae_step_flops(config, shape, sizes, int(p.decoder_layers))
        steps = t.max_steps or math.ceil(t.epochs * (windows // batch))
        from train.smae import ships_mlm_head

        warm = p.head_warmup_steps and not ships_mlm_head(m.name_or_path)  # a shipped head is not warmed up
        warmup = int(p.head_warmup_steps) * head_warmup_flops(config, shape) if warm else 0
        return {"steps": steps, "flops": steps * per_step + warmup, "flops_per_step": per_step, "windows": windows}
    from train.data import GroupCollator, GroupDataset
    from train.methods import plan_method

    plan = plan_method(t, sizes, int(config.num_hidden_layers), int(config.hidden_size), int(cfg.seed))
    groups = _groups(
        str(cfg.data.train),
        str(cfg.data.train_corpus or cfg.data.corpus),
        str(cfg.data.train_split),
        cfg.data.max_train_groups,
    )
    dataset = GroupDataset(groups, int(t.group_size), int(cfg.seed))
    collate = GroupCollator(tokenizer, m.query_max_length, m.passage_max_length, m.query_prefix, m.passage_prefix)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(cfg.seed))).tolist()
    if len(dataset) < batch:
        raise StarbucksError(
            f"{len(dataset)} training groups make no full step of {batch} (batch_size x grad_accum); "
            f"lower train.batch_size or add data"
        )
    sampled = []
    for i in range(min(SAMPLE_BATCHES, len(dataset) // batch)):
        b = collate([dataset[(k, 0)] for k in order[i * batch : (i + 1) * batch]])
        sampled.append(
            retrieval_step_flops(
                config, b["queries"]["attention_mask"], b["passages"]["attention_mask"], plan.schedule.at(i)
            )
        )
    per_step = int(sum(sampled) / len(sampled))
    steps = t.max_steps or max(1, math.ceil(t.epochs * (len(groups) // batch)))
    return {"steps": steps, "flops": steps * per_step, "flops_per_step": per_step}
