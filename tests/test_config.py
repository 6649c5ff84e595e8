import re

import pytest

from conftest import REPO
from retrieval.config import experiment_paths, load_config, sizes_of
from retrieval.errors import StarbucksError


def test_default_config_has_six_minilm_sizes(repo_root):
    cfg = load_config(repo_root / "configs/default.yaml")
    sizes = sizes_of(cfg)
    assert [(s.layers, s.dim) for s in sizes][0] == (1, 32)
    assert [(s.layers, s.dim) for s in sizes][-1] == (6, 384)
    assert len(sizes) == 6 and len({s.layers for s in sizes}) == 6
    assert cfg.model.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"


def test_paper_config_has_the_paper_sizes(repo_root):
    path = repo_root / "configs/msmarco-bert-base.yaml"
    if not path.exists():
        pytest.skip("msmarco-bert-base.yaml not written yet")
    cfg = load_config(path)
    assert [(s.layers, s.dim) for s in sizes_of(cfg)] == [(2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768)]
    assert cfg.model.name_or_path == "bert-base-uncased"


def test_overrides_and_derived_paths(repo_root):
    cfg = load_config(repo_root / "configs/default.yaml", ["name=exp1", "train.learning_rate=1e-4", "train.epochs=3"])
    assert cfg.train.learning_rate == 1e-4 and cfg.train.epochs == 3
    paths = experiment_paths(cfg)
    assert str(paths.model) == "runs/exp1/model" and str(paths.runs) == "runs/exp1/runs"
    cfg = load_config(repo_root / "configs/default.yaml", ["paths.model=/tmp/m"])
    assert str(experiment_paths(cfg).model) == "/tmp/m"


def test_unknown_key_names_the_nearest(repo_root):
    with pytest.raises(
        StarbucksError, match="unknown config key 'train.lerning_rate'.*did you mean 'train.learning_rate'"
    ):
        load_config(repo_root / "configs/default.yaml", ["train.lerning_rate=1"])
    with pytest.raises(StarbucksError, match="did you mean 'model'"):
        load_config(repo_root / "configs/default.yaml", ["modle.pooling=cls"])


def test_yaml_errors_and_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("name: parent\ntrain:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  batch_size: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("parent", 7, 3)
    (tmp_path / "typo.yaml").write_text("base: base.yaml\nsearch:\n  dpeth: 10\n")
    with pytest.raises(StarbucksError, match="'search.dpeth' in .*typo.yaml; did you mean 'search.depth'"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1,\n")
    with pytest.raises(StarbucksError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(StarbucksError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(StarbucksError, match="not key=value"):
        load_config(tmp_path / "base.yaml", ["train.epochs"])


def test_open_sections_accept_user_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  eval_splits:\n    dl19: irds:msmarco-passage/trec-dl-2019/judged\n")
    cfg = load_config(tmp_path / "c.yaml", ["search.params.efSearch=128"])
    assert cfg.data.eval_splits.dl19.startswith("irds:") and cfg.search.params.efSearch == 128
    assert list(cfg.data.eval_splits) == ["dl19"]  # replaces the default splits, does not merge into them


def test_the_settings_dataclasses_state_no_default_of_their_own():
    """A key's default is stated once, in the schema: TrainSettings has none, and a hand-made
    SearchSettings is exactly what the schema's defaults resolve to on the CPU."""
    import dataclasses

    from retrieval.schema import DEFAULTS
    from search.pipeline import SearchSettings
    from train.trainer import TrainSettings

    fields = dataclasses.fields(TrainSettings)
    assert {f.name for f in fields} - {"seed"} <= set(DEFAULTS["train"])
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert SearchSettings() == SearchSettings.from_config(load_config(None, ["search.device=cpu"]))


def test_the_schema_states_each_default_rule_and_doc_once():
    """DEFAULTS, the rules, the open mappings and the docs' key table all come from `retrieval.schema`;
    every key has a doc; no other guide repeats a key table."""
    from retrieval import config, schema

    assert config.DEFAULTS is schema.DEFAULTS and config.OPEN_KEYS is schema.OPEN_KEYS
    flat = {name: key.default for name, key in schema.walk()}
    for name, default in flat.items():
        section = schema.DEFAULTS
        for part in name.split("."):
            section = section[part]
        assert section == default, name
    undocumented = [name for name, key in schema.walk() if len(key.doc.strip()) < 8]
    assert not undocumented, f"keys without a doc: {undocumented}"
    assert set(schema.KEY_RULES) <= set(flat) and not set(schema.KEY_RULES) & schema.OPEN_KEYS
    assert schema.TEXT_OVERRIDES == {name for name, rule in schema.KEY_RULES.items() if rule.literal}
    written = (REPO / schema.REFERENCE).read_text()
    assert written == schema.reference_markdown(), (
        "docs/configuration.md differs from the schema; write it again: .venv/bin/python -c "
        '"from retrieval.schema import write_reference; write_reference()"'
    )
    for name in flat:
        assert f"| `{name}` |" in written, name
    others = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "configuration.md"]
    assert not [n for n in others if "| key | default |" in (REPO / "docs" / n).read_text()], others


def test_search_quantization_is_a_checked_list_of_precisions(tmp_path):
    assert list(load_config(None).search.quantization) == ["fp16"]
    cfg = load_config(None, ["search.quantization=fp16, binary-rescore100"])  # a comma string
    assert list(cfg.search.quantization) == ["fp16", "binary-rescore100"]
    assert list(load_config(None, ["search.quantization=[int8,binary]"]).search.quantization) == ["int8", "binary"]
    (tmp_path / "q.yaml").write_text("search:\n  quantization: int8-rescore20\n")
    assert list(load_config(tmp_path / "q.yaml").search.quantization) == ["int8-rescore20"]
    for bad, words in [
        ("int4", "search.quantization: 'int4' is not a precision; use one of fp16, int8, binary, int8-rescore<K>"),
        ("binary-rescore0", "'binary-rescore0' is not a precision"),
        ("fp16-rescore10", "'fp16-rescore10' is not a precision"),
        ("[fp16,8]", "search.quantization: 8 is not a precision"),
        ("int8,fp16,int8", "search.quantization names 'int8' twice; give each of fp16, int8, binary"),
        ("[]", "search.quantization = [] names no precision"),
    ]:
        with pytest.raises(StarbucksError, match=re.escape(words)) as err:
            load_config(None, [f"search.quantization={bad}"])
        assert len(str(err.value).splitlines()) == 1


def test_a_key_is_checked_once_by_the_schema():
    """What the schema checks fails at load time, in the schema's words (the stages do not check it again)."""
    for override, words in [
        ("search.backend=gpu", "search.backend = 'gpu' is not one of auto, faiss, torch"),
        ("search.torch_dtype=bf16", "search.torch_dtype = 'bf16' is not one of auto, fp16, fp32"),
        ("train.scheduler=cosine_warm", "train.scheduler = 'cosine_warm' is not one of linear, cosine"),
        ("train.method=bogus", "train.method = 'bogus' is not one of srl, 2dmse"),
        ("train.warmup_ratio=1", "train.warmup_ratio = 1 must be >= 0 and < 1"),
        ("train.max_steps=0", "train.max_steps = 0 must be null or a whole number >= 1"),
        ("pretrain.head_warmup_steps=-1", "pretrain.head_warmup_steps = -1 must be a whole number >= 0"),
    ]:
        with pytest.raises(StarbucksError, match=re.escape(words)):
            load_config(None, [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves_every_key(path):
    """Each shipped config loads through the schema (every key known, typed and in range) and its
    settings resolve as the stages resolve them."""
    from search.pipeline import SearchSettings
    from train.trainer import TrainSettings

    if path.parent.name == "suites":
        pytest.skip("a suite file, not a config (tests/test_suite.py reads it)")
    cfg = load_config(path, ["search.device=cpu"])
    TrainSettings.from_config(cfg)
    SearchSettings.from_config(cfg)
