"""Experiment configuration: one YAML file drives all four stages.

A config is the schema's defaults (`retrieval.schema`: every key's default, rule and doc; `DEFAULTS`
here is its defaults), overlaid by the YAML file (which may name a `base:` file it extends, relative
to itself), overlaid by `key=value` command-line overrides (OmegaConf dotlist syntax), then checked
against the schema's rules. Every key must exist in the schema, except under the open mappings
(`OPEN_KEYS`); a typo is an error naming the nearest valid key. Paths of the stages' outputs are
derived from `output_dir` (see `experiment_paths`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from retrieval.errors import StarbucksError
from retrieval.schema import DEFAULTS, OPEN_KEYS, TEXT_OVERRIDES, validate_config
from retrieval.sizes import SizeList

DEFAULT_CONFIG = "configs/default.yaml"


def _check_keys(user: Any, schema: Any, prefix: str, where: str) -> None:
    """Raise on the first key of `user` that the schema does not know."""
    if not isinstance(user, dict) or not isinstance(schema, dict):
        return
    for key, value in user.items():
        full = f"{prefix}{key}"
        if key not in schema:
            near = [prefix + k for k in difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)]
            hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys here: {', '.join(sorted(schema))}"
            raise StarbucksError(f"unknown config key '{full}' in {where}{hint}")
        if full not in OPEN_KEYS:
            _check_keys(value, schema[key], full + ".", where)


def _merge(base, data: dict) -> DictConfig:
    """Merge `data` onto `base`; an open mapping given in `data` replaces the base's whole mapping."""
    base = OmegaConf.create(base if not isinstance(base, DictConfig) else OmegaConf.to_container(base))
    for key in OPEN_KEYS:
        section, name = key.split(".")
        if isinstance(data.get(section), dict) and name in data[section] and section in base:
            base[section][name] = {}
    return OmegaConf.merge(base, data)


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML config, following its `base:` chain (relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise StarbucksError(f"config {path} extends itself through `base:`; remove the cycle")
    if not path.is_file():
        raise StarbucksError(f"config file {path} not found; pass --config PATH (default: {DEFAULT_CONFIG})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise StarbucksError(f"config {path}{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise StarbucksError(f"config {path} must be a mapping of sections, not {type(data).__name__}")
    base = data.pop("base", None)
    _check_keys(data, DEFAULTS, "", str(path))
    if base is None:
        return data
    parent = _read_yaml(path.parent / base, seen + (path,))
    return OmegaConf.to_container(_merge(parent, data))


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Load a config: schema defaults <- YAML (with `base:` chain) <- `key=value` overrides."""
    cfg = OmegaConf.create(DEFAULTS)
    if path is not None:
        cfg = _merge(cfg, _read_yaml(Path(path)))
    dot = _parse_overrides(list(overrides))
    _check_keys(dot, DEFAULTS, "", "the command line")
    cfg = OmegaConf.merge(cfg, dot)  # entry by entry: `data.eval_splits.dev=...` keeps the other splits
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise StarbucksError(f"config interpolation failed: {err}") from None
    _drop_removed_entries(cfg)
    validate_config(cfg)
    sizes_of(cfg)  # validate early
    return cfg


def _parse_overrides(overrides: list[str]) -> dict:
    """`key=value` items as a nested dict (OmegaConf dotlist syntax); keys that hold names keep their
    value as written (`encode.sizes=0x32` is a size, not the hex number 50)."""
    parsed, literal = [], {}
    for item in overrides:
        if "=" not in item:
            raise StarbucksError(f"override {item!r} is not key=value (example: train.learning_rate=1e-4)")
        key, value = item.split("=", 1)
        if key.strip() in TEXT_OVERRIDES and value.strip() not in ("null", "") and not value.lstrip().startswith("["):
            literal[key.strip()] = value.strip()
        else:
            parsed.append(item)
    try:
        dot = OmegaConf.from_dotlist(parsed)
        for key, value in literal.items():
            OmegaConf.update(dot, key, value, force_add=True)
    except OmegaConfBaseException as err:
        raise StarbucksError(f"cannot parse overrides {overrides}: {err}") from None
    return OmegaConf.to_container(dot)


def _drop_removed_entries(cfg: DictConfig) -> None:
    """`null` removes an entry of an open mapping (`data.eval_splits.dev=null` drops an inherited split)."""
    for key in OPEN_KEYS:
        mapping = OmegaConf.select(cfg, key)
        if isinstance(mapping, DictConfig):
            for name in [k for k, v in mapping.items() if v is None]:
                del mapping[name]


def sizes_of(cfg: DictConfig) -> SizeList:
    """The config's ordered size list."""
    entries = cfg.sizes
    if isinstance(entries, (ListConfig, DictConfig)):
        entries = OmegaConf.to_container(entries)
    return SizeList.from_config(entries).require_ordered("sizes")


@dataclass(frozen=True)
class ExperimentPaths:
    """Where each stage reads and writes, derived from one experiment directory."""

    root: Path
    model: Path
    embeddings: Path
    index: Path
    runs: Path
    eval: Path


def experiment_paths(cfg: DictConfig) -> ExperimentPaths:
    root = Path(cfg.output_dir)
    p = cfg.paths

    def pick(key: str) -> Path:
        return Path(p[key]) if p.get(key) else root / key

    return ExperimentPaths(root, pick("model"), pick("embeddings"), pick("index"), pick("runs"), pick("eval"))
