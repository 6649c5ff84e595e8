"""The paper's comparison as a plain pipeline: one run per method, each the four stages.

`plan_runs(cfg)` turns an experiment config into runs: `zeroshot` (the backbone, no training),
`full`, one `separate-<size>` per size, `2dmse`, `srl`, `srl-nokl` (SRL with `train.kl_weight=0`,
the paper's Table 2 ablation), and `smae` pre-training followed by `smae-srl`. Every run is the
experiment's own config (same data, sizes and hyperparameters) plus a few method overrides, with
its outputs under `<output_dir>/<run>`. `run_experiment` trains, encodes, searches and evaluates
each run in order; every stage reuses what a previous invocation finished (training resumes from
its checkpoints, encoding keeps finished shards, search keeps up-to-date run files), so running
it again after a failure redoes only what is missing.

With `experiment.grid` every run also encodes and searches the whole (layer, dim) grid (layers
1..N x the size list's dims): one extra forward pass costs nothing (early exit shares the layers
and a dim is a prefix), and the report draws the paper's heatmaps from it. A `separate` model
only has its own layers, so it covers its row of the grid.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from experiment.report import ReportedRun, write_report
from retrieval.config import experiment_paths, load_config, sizes_of
from retrieval.errors import StarbucksError
from retrieval.names import parse_names
from retrieval.sizes import Size, SizeList

METHODS = ("zeroshot", "full", "separate", "2dmse", "srl", "srl-nokl", "smae-srl")  # labels: experiment.report.LABELS


@dataclass(frozen=True)
class Run:
    """One trained (or not) model of the experiment and the overrides that make its config."""

    name: str  # directory under the experiment's output_dir
    method: str  # the METHODS entry it reports under
    overrides: tuple[str, ...]
    train: str | None  # finetune | pretrain | None (zero-shot)
    sizes: tuple[Size, ...]  # what it encodes, searches and evaluates
    report: bool = True  # False: a pre-training step, not evaluated


def grid_sizes(sizes: SizeList, num_layers: int, layers: int | None = None) -> list[Size]:
    """The (layer, dim) grid: every layer 1..num_layers (or only `layers`) x every dim of the size list.
    A cell that is a configured size keeps its name."""
    named = {(s.layers, s.dim): s for s in sizes}
    dims = sorted({s.dim for s in sizes})
    rows = [layers] if layers is not None else range(1, num_layers + 1)
    return [named.get((n, d), Size("", n, d)) for n in rows for d in dims]


def _with(sizes: list[Size], extra: list[Size]) -> tuple[Size, ...]:
    out = list(sizes)
    keys = {(s.layers, s.dim) for s in out}
    out += [s for s in extra if (s.layers, s.dim) not in keys]
    return tuple(out)


def selected_methods(cfg: DictConfig) -> list[str]:
    wanted = parse_names(cfg.experiment.methods)
    if wanted is None:
        return list(METHODS)
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise StarbucksError(f"experiment.methods: unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    return [m for m in METHODS if m in wanted]


def plan_runs(cfg: DictConfig) -> list[Run]:
    """The runs of the experiment, in the order they execute."""
    sizes = sizes_of(cfg)
    num_layers = sizes.largest.layers
    grid = bool(cfg.experiment.grid)
    full_grid = grid_sizes(sizes, num_layers) if grid else []
    everything = _with(list(sizes), full_grid)
    root = Path(cfg.output_dir)
    runs: list[Run] = []

    def add(name: str, method: str, overrides: list[str], train: str | None, run_sizes, **kw) -> None:
        base = [f"name={cfg.name}-{name}", f"output_dir={root / name}"]
        runs.append(Run(name, method, tuple(base + overrides), train, tuple(run_sizes), **kw))

    for method in selected_methods(cfg):
        if method == "zeroshot":
            add("zeroshot", method, ["encode.model=${model.name_or_path}"], None, everything)  # the backbone, named
        elif method in ("full", "2dmse", "srl"):
            add(method, method, [f"train.method={method}"], "finetune", everything)
        elif method == "srl-nokl":
            add(method, method, ["train.method=srl", "train.kl_weight=0"], "finetune", everything)
        elif method == "separate":
            for s in sizes:
                row = grid_sizes(sizes, num_layers, s.layers) if grid else []
                add(f"separate-{s.name}", method, ["train.method=separate", f"train.size={s.name}"], "finetune",
                    _with([s], row))
        elif method == "smae-srl":  # pre-training first: smae-srl starts from its model
            smae = ["train.method=smae", "model.pooling=cls", "model.normalize=false", *cfg.experiment.smae]
            add("smae", "smae", smae, "pretrain", (), report=False)
            model = root / "smae" / "model"
            add(method, method, ["train.method=srl", f"model.name_or_path={model}"], "finetune", everything)
    return runs


def run_config(cfg_path: str | None, overrides: list[str], run: Run) -> DictConfig:
    """The run's config: the experiment's file and overrides, then the run's own."""
    spec = ",".join(s.name for s in run.sizes) or "all"
    stage_sizes = [f"encode.sizes={spec}", f"search.sizes={spec}", f"eval.sizes={spec}"] if run.sizes else []
    return load_config(cfg_path, [*overrides, *run.overrides, *stage_sizes])


def reported_runs(cfg_path: str | None, overrides: list[str], runs: list[Run]) -> list[ReportedRun]:
    """The runs the report shows, each with the directory its eval files are in (and, with
    `experiment.suite`, those of its out-of-domain suite cells)."""
    cfg = load_config(cfg_path, overrides)
    collections = suite_collections(cfg)
    return [ReportedRun(r.name, r.method, r.sizes, experiment_paths(run_config(cfg_path, overrides, r)).eval,
                        tuple((c.name, c.split, suite_dir(cfg) / r.name / c.name / "eval") for c in collections))
            for r in runs if r.report]


def suite_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir) / "suite"


def suite_collections(cfg: DictConfig) -> list:
    """The collections of `experiment.suite` (none without one)."""
    if not cfg.experiment.suite:
        return []
    from eval.suite import read_suite_file, suite_collections as collections

    return collections(read_suite_file(cfg.experiment.suite))


def run_out_of_domain(cfg: DictConfig, cfg_path: str | None, overrides: list[str], runs: list[Run]) -> None:
    """`eval.suite` over `experiment.suite`'s collections for every reported run's model: its trained model,
    or (zero-shot) the backbone with the config's model settings and sizes; each at its own sizes."""
    from eval.suite import DEFAULT_DEPTH, DEFAULT_MEASURES, SuiteModel, read_suite_file, run_suite

    suite = read_suite_file(cfg.experiment.suite)
    models = []
    for r in runs:
        if not r.report:
            continue
        run_cfg = run_config(cfg_path, overrides, r)
        if r.train is None:
            defaults = {**OmegaConf.to_container(run_cfg.model, resolve=True), "sizes": sizes_of(run_cfg).to_config()}
            models.append(SuiteModel(r.name, str(run_cfg.encode.model), defaults))
        else:
            models.append(SuiteModel(r.name, str(experiment_paths(run_cfg).model)))
    print(f"\n== experiment {cfg.name}: out-of-domain suite {cfg.experiment.suite}", file=sys.stderr, flush=True)
    run_suite(models, suite_collections(cfg), suite_dir(cfg), suite.get("metrics") or DEFAULT_MEASURES, None,
              int(suite.get("depth", DEFAULT_DEPTH)), int(cfg.encode.batch_size), str(cfg.encode.device),
              str(cfg.encode.precision))


def _stages(run: Run) -> list[tuple[str, Callable[[DictConfig], object]]]:
    """The stage functions of a run (imported here: the experiment drives the stages, as make does)."""
    stages: list[tuple[str, Callable]] = []
    if run.train == "finetune":
        from train.finetune import run_training

        stages.append(("train", run_training))
    elif run.train == "pretrain":
        from train.pretrain import run_pretraining

        stages.append(("pretrain", run_pretraining))
    if run.report:
        from encode.pipeline import encode_collection
        from eval.pipeline import evaluate_experiment
        from search.pipeline import search_collection

        stages += [("encode", encode_collection), ("search", search_collection), ("eval", evaluate_experiment)]
    return stages


def run_experiment(cfg_path: str | None, overrides: list[str] = (), only: str | None = None,
                   report_only: bool = False) -> list[Run]:
    """Run (or finish) every run of the experiment, then write the report; returns the runs.
    `only`: a comma list of runs to do (no report); `report_only`: skip the runs, rewrite the report."""
    overrides = list(overrides)
    cfg = load_config(cfg_path, overrides)
    runs = plan_runs(cfg)
    if only:
        wanted = parse_names(only) or []
        unknown = [w for w in wanted if w not in {r.name for r in runs}]
        if unknown:
            raise StarbucksError(f"--only {unknown[0]!r} is not a run of this experiment; "
                                 f"runs: {', '.join(r.name for r in runs)}")
    for i, run in enumerate(runs, 1):
        if report_only or (only and run.name not in wanted):
            continue
        run_cfg = run_config(cfg_path, overrides, run)
        for stage, fn in _stages(run):
            started = time.perf_counter()
            print(f"\n== experiment {cfg.name}: run {i}/{len(runs)} {run.name}: {stage}", file=sys.stderr, flush=True)
            fn(run_cfg)
            print(f"== {run.name}: {stage} done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    if not only:
        if cfg.experiment.suite and not report_only:
            run_out_of_domain(cfg, cfg_path, overrides, runs)
        write_report(cfg, reported_runs(cfg_path, overrides, runs), cfg_path, overrides)
    return runs


def describe(cfg: DictConfig) -> str:
    """The plan, one line per run (for --dry-run)."""
    lines = []
    for r in plan_runs(cfg):
        what = {"finetune": "train", "pretrain": "pre-train", None: "no training"}[r.train]
        sizes = f"{len(r.sizes)} sizes" if r.sizes else "-"
        lines.append(f"{r.name:18s} {what:12s} {sizes:9s} {' '.join(r.overrides[2:])}")
    return "\n".join(lines)
