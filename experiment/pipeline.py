"""The paper's comparison as a plain pipeline: one run per method, each the four stages.

`plan_runs(cfg)` turns an experiment config into runs: `zeroshot` (the backbone, no training),
`full`, one `separate-<size>` per size, `2dmse`, `srl`, `srl-nokl` (SRL with `train.kl_weight=0`,
the paper's Table 2 ablation), `smae` pre-training followed by `smae-srl`, and `srl-matched`
(not in the paper: SRL trained for the FLOPs of all the separate models together, its step count
set from their recorded cost and the `srl` run's FLOPs per step; "one run or six for the same
compute?"). `srl`, `2dmse` and `separate` run once per seed of `experiment.seeds` (the first seed's
runs keep the plain names, the others end in `-seed<N>`; the first seed also seeds every other
run), and the report averages over the seeds. The paper's v3 variants (read from its abstract:
docs/training.md): `srl-depth` and `srl-width` (SRL over the layers at full width, over the dims
at full depth), and `hybrid`, no training of its own: the hybrid sizes of `experiment.hybrids`
(default: per size `(n, d)` of the list below the full size in both, `n x (D-d) + N x d@srl-width`,
the bytes of one full-width vector), their unlabelled parts from srl-depth's model and `@<run>`
parts from that run's, encoded in parallel. The runs a hybrid's parts come from also evaluate each
part alone and at the hybrid's bytes (the report's equal-bytes comparison). Every run is the
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

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from experiment.report import HYBRID_BASE, ReportedRun, write_report
from retrieval.config import experiment_paths, load_config, sizes_of
from retrieval.cost import read_train_summary
from retrieval.errors import StarbucksError
from retrieval.names import parse_names
from retrieval.sizes import HYBRID_HELP, Size, SizeList, parse_size

METHODS = (
    "zeroshot",
    "full",
    "separate",
    "2dmse",
    "srl",
    "srl-matched",
    "srl-nokl",
    "smae-srl",
    "srl-depth",
    "srl-width",
    "hybrid",
)  # labels: report.LABELS
SEEDED = ("separate", "2dmse", "srl")  # the methods repeated per seed of experiment.seeds
ONE_D = ("srl-depth", "srl-width")  # the 1D Starbucks methods (train.methods.one_dimensional)


@dataclass(frozen=True)
class Run:
    """One trained (or not) model of the experiment and the overrides that make its config."""

    name: str  # directory under the experiment's output_dir
    method: str  # the METHODS entry it reports under
    overrides: tuple[str, ...]
    train: str | None  # finetune | pretrain | None (zero-shot)
    sizes: tuple[Size, ...]  # what it encodes, searches and evaluates
    report: bool = True  # False: a pre-training step, not evaluated
    seed: int | None = None  # the run's `seed`


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
    chosen = [m for m in METHODS if m in wanted]
    if "srl-matched" in chosen and not {"srl", "separate"} <= set(chosen):
        raise StarbucksError(
            "experiment.methods: srl-matched needs srl and separate (its step count follows from "
            "the separate models' recorded FLOPs and SRL's FLOPs per step); add them"
        )
    return chosen


def hybrid_sizes(cfg: DictConfig, sizes: SizeList) -> list[Size]:
    """`experiment.hybrids`, or (null) one per size `(n, d)` of the list with `n < N` and `d < D`: srl-depth's
    `(n, D-d)` joined with srl-width's `(N, d)` (`n x (D-d) + N x d@srl-width`), as many bytes as one
    full-width vector."""
    specs = parse_names(cfg.experiment.hybrids) if cfg.experiment.hybrids is not None else None
    if specs is None:
        full = sizes.largest
        specs = [
            f"{s.layers}x{full.dim - s.dim}+{full.layers}x{s.dim}@srl-width"
            for s in sizes
            if s.layers < full.layers and s.dim < full.dim
        ]
        if not specs:
            raise StarbucksError(
                "experiment.hybrids: no size of the list is below the full size in both layers and "
                "dims, so none can be derived; give experiment.hybrids (e.g. [3x64+6x32@srl-width])"
            )
    out = [parse_size(spec) for spec in specs]
    flat = [s.key for s in out if not s.parts]
    if flat:
        raise StarbucksError(f"experiment.hybrids: {flat[0]} is not a hybrid; {HYBRID_HELP}")
    return out


def _hybrid_sources(hybrids: Sequence[Size], runs: Sequence["Run"]) -> dict[str, "Run"]:
    """Each model label of the hybrids (`""`: unlabelled parts, srl-depth's) -> the run whose model it is;
    one line when a label names no trained run planned before it."""
    trained = {r.name: r for r in runs if r.train == "finetune"}
    out = {}
    for h in hybrids:
        for p in h.parts:
            name = p.model or HYBRID_BASE
            if name not in trained:
                raise StarbucksError(
                    f"hybrid {h.key}: its part {p.key} comes from run {name!r}, which this experiment does not train "
                    f"(trained: {', '.join(trained) or 'none'}); add its method to experiment.methods or change "
                    f"experiment.hybrids (unlabelled parts come from {HYBRID_BASE})"
                )
            out[p.model] = trained[name]
    return out


def experiment_seeds(cfg: DictConfig) -> list[int]:
    """`experiment.seeds` (null: `[seed]`): one run of each SEEDED method per seed."""
    seeds = cfg.experiment.seeds
    if seeds is None:
        return [int(cfg.seed)]
    values = list(seeds) if isinstance(seeds, (list, ListConfig)) else [seeds]
    if (
        not values
        or any(isinstance(v, bool) or not isinstance(v, int) for v in values)
        or len(set(values)) < len(values)
    ):
        raise StarbucksError(
            f"experiment.seeds = {values} must be a list of distinct whole numbers (or null: the config's seed)"
        )
    return values


def plan_runs(cfg: DictConfig) -> list[Run]:
    """The runs of the experiment, in the order they execute."""
    sizes = sizes_of(cfg)
    num_layers = sizes.largest.layers
    grid = bool(cfg.experiment.grid)
    full_grid = grid_sizes(sizes, num_layers) if grid else []
    everything = _with(list(sizes), full_grid)
    root = Path(cfg.output_dir)
    seeds = experiment_seeds(cfg)
    runs: list[Run] = []

    def add(
        name: str, method: str, overrides: list[str], train: str | None, run_sizes, seed: int = seeds[0], **kw
    ) -> None:
        name = name if seed == seeds[0] else f"{name}-seed{seed}"
        base = [f"name={cfg.name}-{name}", f"output_dir={root / name}"]
        base += [f"seed={seed}"] if seed != int(cfg.seed) else []
        runs.append(Run(name, method, tuple(base + overrides), train, tuple(run_sizes), seed=seed, **kw))

    for method in selected_methods(cfg):
        if method == "hybrid":  # no training: the hybrids of models trained above, encoded, searched, evaluated
            hybrids = hybrid_sizes(cfg, sizes)
            sources = _hybrid_sources(hybrids, runs)
            models = [f"encode.model={root / sources[''].name / 'model'}"] if "" in sources else []
            models += [
                f"encode.part_models.{label}={root / run.name / 'model'}" for label, run in sources.items() if label
            ]
            if "" not in sources:  # every part labelled: the first label's model encodes, the others join it
                models = [f"encode.model={root / next(iter(sources.values())).name / 'model'}"] + models
            add("hybrid", method, models, None, hybrids)
            for i, run in enumerate(runs):  # the part models also evaluate each part, alone and at the hybrid's
                # bytes, and SRL the hybrid's layers and bytes (the report's comparisons at equal bytes)
                extra = [
                    Size("", q.layers, q.dim)
                    for h in hybrids
                    for p in h.parts
                    if sources[p.model] is run
                    for q in (p.size, Size("", p.size.layers, h.dim))
                    if q.dim <= sizes.largest.dim
                ]
                extra += [
                    Size("", h.layers, h.dim) for h in hybrids if run.method == "srl" and h.dim <= sizes.largest.dim
                ]
                if extra:
                    runs[i] = dataclasses.replace(run, sizes=_with(list(run.sizes), extra))
            continue
        for seed in seeds if method in SEEDED else seeds[:1]:
            if method == "zeroshot":
                add("zeroshot", method, ["encode.model=${model.name_or_path}"], None, everything)  # the backbone
            elif method in ("full", "2dmse", "srl"):
                add(method, method, [f"train.method={method}"], "finetune", everything, seed)
            elif method == "srl-matched":  # train.max_steps is set when it trains (matched_steps)
                add(method, method, ["train.method=srl"], "finetune", everything)
            elif method == "srl-nokl":
                add(method, method, ["train.method=srl", "train.kl_weight=0"], "finetune", everything)
            elif method in ONE_D:  # its model lists its 1D sizes only: every other size asked for by LxD
                axis = method.split("-")[1]
                trained = [
                    parse_size(
                        f"{s.layers}x{sizes.largest.dim}" if axis == "depth" else f"{sizes.largest.layers}x{s.dim}"
                    )
                    for s in sizes
                ]
                add(
                    method,
                    method,
                    [f"train.method={method}"],
                    "finetune",
                    _with([Size("", s.layers, s.dim) for s in everything], trained),
                )
            elif method == "separate":
                for s in sizes:
                    row = grid_sizes(sizes, num_layers, s.layers) if grid else []
                    add(
                        f"separate-{s.name}",
                        method,
                        ["train.method=separate", f"train.size={s.name}"],
                        "finetune",
                        _with([s], row),
                        seed,
                    )
            elif method == "smae-srl":  # pre-training first (its bottleneck pooled as model.pooling): then SRL
                add(
                    "smae",
                    "smae",
                    ["train.method=smae", "model.normalize=false", *cfg.experiment.smae],
                    "pretrain",
                    (),
                    report=False,
                )
                model = root / "smae" / "model"
                add(method, method, ["train.method=srl", f"model.name_or_path={model}"], "finetune", everything)
    return runs


def run_root(cfg_path: str | None, overrides: list[str], run: Run) -> Path:
    return experiment_paths(run_config(cfg_path, overrides, run)).root


def matched_steps(cfg_path: str | None, overrides: list[str], runs: list[Run], run: Run) -> int:
    """`srl-matched`'s step count: the FLOPs the separate models of its seed recorded (`train_summary.json`),
    together, over the FLOPs per step the `srl` run of that seed recorded."""
    separate = [r for r in runs if r.method == "separate" and r.seed == run.seed]
    srl = next(r for r in runs if r.method == "srl" and r.seed == run.seed)
    costs = {r.name: read_train_summary(run_root(cfg_path, overrides, r)) for r in [*separate, srl]}
    missing = [name for name, cost in costs.items() if cost is None]
    if missing:
        raise StarbucksError(
            f"srl-matched needs the recorded cost of {missing[0]}, which has not finished training; "
            f"run `python -m experiment` without --only, or --only {missing[0]} first"
        )
    return matched_step_count(
        sum(costs[r.name]["flops"] for r in separate), costs[srl.name]["flops"] / costs[srl.name]["steps"]
    )


def matched_step_count(budget: float, per_step: float) -> int:
    """SRL steps that spend `budget` FLOPs at `per_step` each (at least one)."""
    return max(1, round(budget / per_step))


def cost_dirs(runs: list[Run], run: Run, cfg_path: str | None, overrides: list[str]) -> tuple[Path, ...]:
    """Where a reported run's training cost is recorded: its own directory, and SMAE's for smae-srl
    (every `train_summary.json` under them counts: the head warm-up's too); the hybrid's: those of the runs
    its parts come from."""
    if run.method == "hybrid":
        names = {p.model or HYBRID_BASE for h in run.sizes for p in h.parts}
        return tuple(run_root(cfg_path, overrides, r) for r in runs if r.name in names)
    dirs = [run_root(cfg_path, overrides, run)]
    if run.method == "smae-srl":
        dirs += [run_root(cfg_path, overrides, r) for r in runs if r.method == "smae"]
    return tuple(dirs)


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
    return [
        ReportedRun(
            r.name,
            r.method,
            r.sizes,
            experiment_paths(run_config(cfg_path, overrides, r)).eval,
            tuple(
                (c.name, c.split, suite_dir(cfg) / r.name / c.name / "eval")
                for c in collections
                if r.method != "hybrid"
            ),
            seed=r.seed,
            cost_dirs=cost_dirs(runs, r, cfg_path, overrides),
        )
        for r in runs
        if r.report
    ]


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
    or (zero-shot) the backbone with the config's model settings and sizes; each at its own sizes. The
    hybrid arm is not in it (the suite encodes one model's sizes)."""
    from eval.suite import DEFAULT_DEPTH, DEFAULT_MEASURES, SuiteModel, read_suite_file, run_suite

    suite = read_suite_file(cfg.experiment.suite)
    models = []
    for r in runs:
        if not r.report or r.method == "hybrid":
            continue
        run_cfg = run_config(cfg_path, overrides, r)
        if r.train is None:
            defaults = {**OmegaConf.to_container(run_cfg.model, resolve=True), "sizes": sizes_of(run_cfg).to_config()}
            models.append(SuiteModel(r.name, str(run_cfg.encode.model), defaults))
        else:
            models.append(SuiteModel(r.name, str(experiment_paths(run_cfg).model)))
    print(f"\n== experiment {cfg.name}: out-of-domain suite {cfg.experiment.suite}", file=sys.stderr, flush=True)
    run_suite(
        models,
        suite_collections(cfg),
        suite_dir(cfg),
        suite.get("metrics") or DEFAULT_MEASURES,
        None,
        int(suite.get("depth", DEFAULT_DEPTH)),
        int(cfg.encode.batch_size),
        str(cfg.encode.device),
        str(cfg.encode.precision),
    )


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


def run_experiment(
    cfg_path: str | None, overrides: list[str] = (), only: str | None = None, report_only: bool = False
) -> list[Run]:
    """Run (or finish) every run of the experiment, then write the report; returns the runs.
    `only`: a comma list of runs to do (no report); `report_only`: skip the runs, rewrite the report."""
    overrides = list(overrides)
    cfg = load_config(cfg_path, overrides)
    runs = plan_runs(cfg)
    if only:
        wanted = parse_names(only) or []
        unknown = [w for w in wanted if w not in {r.name for r in runs}]
        if unknown:
            raise StarbucksError(
                f"--only {unknown[0]!r} is not a run of this experiment; runs: {', '.join(r.name for r in runs)}"
            )
    for i, run in enumerate(runs, 1):
        if report_only or (only and run.name not in wanted):
            continue
        if run.method == "srl-matched":
            run = dataclasses.replace(
                run, overrides=(*run.overrides, f"train.max_steps={matched_steps(cfg_path, overrides, runs, run)}")
            )
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


GPU_PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
GPU_MFU = 0.10  # what the training loop reaches there (docs/benchmarks.md: 8-12% for BERT-base SRL steps)


def describe(cfg: DictConfig, cfg_path: str | None = None, overrides: list[str] = (), estimate: bool = False) -> str:
    """The plan, one line per run (for --dry-run); with `estimate`, each training run's steps and model FLOPs
    (`train.estimate.estimate_training`, from the real data) and its time at `GPU_MFU` of an H100's peak."""
    runs = plan_runs(cfg)
    costs: dict[str, dict] = {}
    if estimate:
        from train.estimate import estimate_training

        for r in runs:
            if r.train and r.method != "srl-matched":  # smae-srl: as its backbone (its model is not trained yet)
                backbone = [f"model.name_or_path={cfg.model.name_or_path}"] if r.method == "smae-srl" else []
                costs[r.name] = estimate_training(load_config(cfg_path, [*overrides, *r.overrides, *backbone]))
        for r in runs:  # srl-matched: the separate models' FLOPs over an SRL step's
            if r.method == "srl-matched":
                budget = sum(costs[s.name]["flops"] for s in runs if s.method == "separate" and s.seed == r.seed)
                per_step = next(costs[s.name] for s in runs if s.method == "srl" and s.seed == r.seed)["flops_per_step"]
                costs[r.name] = {
                    "steps": matched_step_count(budget, per_step),
                    "flops": budget,
                    "flops_per_step": per_step,
                }
    lines = []
    for r in runs:
        what = {"finetune": "train", "pretrain": "pre-train", None: "no training"}[r.train]
        sizes = f"{len(r.sizes)} sizes" if r.sizes else "-"
        cost = costs.get(r.name)
        spent = (
            f"{cost['steps']:6d} steps {cost['flops'] / 1e15:8.2f} PFLOP ~{cost['flops'] / (GPU_PEAK_FLOPS * GPU_MFU):6.1f} s "
            if cost
            else ""
        )
        lines.append(f"{r.name:24s} {what:12s} {sizes:9s} {spent}{' '.join(r.overrides[2:])}")
    if costs:
        total = sum(c["flops"] for c in costs.values())
        lines.append(
            f"training in all: {total / 1e15:.2f} PFLOP, ~{total / (GPU_PEAK_FLOPS * GPU_MFU) / 60:.1f} min "
            f"at {GPU_MFU:.0%} of {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s (an H100's bf16 peak)"
        )
    return "\n".join(lines)
