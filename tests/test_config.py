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
    """A key's default is stated once, in retrieval.config.DEFAULTS: TrainSettings has none, and a
    hand-made SearchSettings takes the config's."""
    import dataclasses

    from retrieval.config import DEFAULTS
    from search.pipeline import SearchSettings
    from train.trainer import TrainSettings

    fields = dataclasses.fields(TrainSettings)
    assert {f.name for f in fields} - {"seed"} <= set(DEFAULTS["train"])
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    made = SearchSettings()
    for key in ("index", "depth", "batch_size", "train_rows"):
        assert getattr(made, key) == DEFAULTS["search"][key], key


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves_every_key(path):
    """Each shipped config loads through the schema (every key known, typed and in range) and its
    settings resolve as the stages resolve them."""
    from retrieval.config import load_config
    from train.trainer import TrainSettings

    if path.parent.name == "suites":
        pytest.skip("a suite file, not a config (tests/test_suite.py reads it)")
    cfg = load_config(path)
    TrainSettings.from_config(cfg)
