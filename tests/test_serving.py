"""What servers read from a checkpoint and its exports, checked offline against the servers' own rules.

- vLLM: `config.json`'s `matryoshka_dimensions` / `is_matryoshka` (its `ModelConfig.is_matryoshka`, and
  `PoolingParams` refuses a `dimensions` outside the list); its embedding head pools as `1_Pooling` says,
  applies the `Dense` modules of `modules.json`, cuts to `dimensions`, then normalises when
  `modules.json` has a `Normalize` (vllm/model_executor/layers/pooler.py, transformers_utils/config.py).
- text-embeddings-inference: the files and keys its router and candle backend parse (`config.json`,
  `tokenizer.json`, `1_Pooling/config.json`, `sentence_bert_config.json`, `modules.json` with the
  four module types it knows, `2_Dense/config.json` + `linear.weight`); it cuts to any `dimensions`
  and normalises unless the request says `normalize: false`.
- sentence-transformers: every module folder exists, as `SentenceTransformer.save` writes it, and
  `truncate_dim` is the export's own dim.
The vectors each emulation gives are compared with `StarbucksModel`'s at the size it should be.
Also: `exported_from` is absolute, and `starbucks --help` shows each command's own usage.
"""

import importlib
import json
import re

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from retrieval import StarbucksModel
from retrieval.checkpoint import resolve_model_path, save_encoder
from retrieval.encoder import StarbucksEncoder
from train.export import export, source_path

st = pytest.importorskip("sentence_transformers")

TEXTS = ["apt installs packages", "a", "the quick brown fox jumps over the lazy dog " * 3, "font editor"]
DIAGONAL = [  # SRL's list: one size per depth
    {"name": "small", "layers": 1, "dim": 8},
    {"name": "mid", "layers": 2, "dim": 16},
    {"name": "full", "layers": 4, "dim": 32},
]
MIXED = [  # two sizes at depth 2, two at the full depth 4
    {"name": "a", "layers": 1, "dim": 8},
    {"name": "b", "layers": 2, "dim": 8},
    {"name": "c", "layers": 2, "dim": 16},
    {"name": "d", "layers": 4, "dim": 24},
    {"name": "full", "layers": 4, "dim": 32},
]
WIDTH = [{"name": f"w{d}", "layers": 4, "dim": d} for d in (8, 16, 32)]  # srl-width: every size at full depth
# the dims a server may cut each folder's output to: the sizes trained at its depth, up to its own dim
EXPECTED = {  # list, training method, folder -> dims
    "diagonal": (DIAGONAL, "srl", {"checkpoint": [32], "mid": [16], "small": [8]}),
    "mixed": (MIXED, "srl", {"checkpoint": [24, 32], "c": [8, 16], "b": [8], "d": [24]}),
    "width": (WIDTH, "srl-width", {"checkpoint": [8, 16, 32], "w16": [8, 16]}),
    "2dmse": (DIAGONAL, "2dmse", {"checkpoint": [8, 16, 32], "mid": [8, 16]}),  # (n, d) and (N, d) terms
    "full": (WIDTH, "full", {"checkpoint": [32], "w16": [16]}),  # the list is only evaluated
}
TEI_MODULE_TYPES = {f"sentence_transformers.models.{k}" for k in ("Transformer", "Pooling", "Dense", "Normalize")}


def save_tiny(path, sizes, pooling="mean", normalize=True, prefixes=("query: ", "passage: "), method="srl"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"))
    meta = {"sizes": sizes, "method": method, "query_max_length": 8, "passage_max_length": 16}
    meta.update(query_prefix=prefixes[0], passage_prefix=prefixes[1])
    encoder = StarbucksEncoder(tiny_bert(layers=4, hidden=32, vocab=tok.vocab_size, seed=5), pooling, normalize)
    save_encoder(encoder, path, tok, meta)
    return path


def read(folder, name):
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def saved(request, tmp_path_factory):
    """A checkpoint trained on one of the size lists, and an export of each of the other expected sizes."""
    sizes, method, expected = EXPECTED[request.param]
    root = tmp_path_factory.mktemp(request.param)
    dot = request.param in ("mixed", "2dmse")  # CLS pooling and the dot product, as the paper's BERT-base
    model_dir = save_tiny(root / "model", sizes, "cls" if dot else "mean", normalize=not dot, method=method)
    names = [name for name in expected if name != "checkpoint"]
    for name in names:
        export(str(model_dir), [name], root / "st" / name)
    folders = {"checkpoint": model_dir, **{name: root / "st" / name for name in names}}
    return model_dir, folders, expected


def test_config_json_has_the_dims_a_server_may_cut_to(saved):
    _, folders, expected = saved
    for name, folder in folders.items():
        config = read(folder, "config.json")
        assert config["matryoshka_dimensions"] == expected[name], name
        assert config["is_matryoshka"] is (len(expected[name]) > 1), name


def hidden_states(folder, texts, max_length):
    """What a server's copy of the HF model gives: the last hidden state of the model as config.json
    describes it (its layers), on right-padded texts cut at `max_length`."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the pooler, which no server here uses, is not saved
    try:
        model = AutoModel.from_pretrained(folder).eval()
    finally:
        hf_logging.set_verbosity(level)
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"]


def pooled_and_projected(folder, texts):
    """Pooling as `1_Pooling/config.json` says (the first true mode, as vLLM reads it), then the
    `Dense` modules `modules.json` lists, each from its folder's config and `linear.weight`."""
    from safetensors.torch import load_file

    states, mask = hidden_states(folder, texts, read(folder, "sentence_bert_config.json")["max_seq_length"])
    modules = read(folder, "modules.json")
    (pooling,) = [m for m in modules if m["type"] == "sentence_transformers.models.Pooling"]
    mode = next(k for k, v in read(folder / pooling["path"], "config.json").items() if v is True)
    if mode == "pooling_mode_cls_token":
        x = states[:, 0]
    else:
        assert mode == "pooling_mode_mean_tokens", mode
        m = mask.unsqueeze(-1).float()
        x = (states * m).sum(1) / m.sum(1)
    for dense in (m for m in modules if m["type"] == "sentence_transformers.models.Dense"):
        config = read(folder / dense["path"], "config.json")
        weight = load_file(str(folder / dense["path"] / "model.safetensors"))["linear.weight"]
        assert weight.shape == (config["out_features"], config["in_features"]) and config["bias"] is False
        assert config["activation_function"] == "torch.nn.modules.linear.Identity"
        x = x @ weight.T
    return x, any(m["type"] == "sentence_transformers.models.Normalize" for m in modules)


def vllm_embed(folder, texts, dimensions=None):
    """vLLM's embedding head on this folder: a `dimensions` outside `matryoshka_dimensions` is refused
    (PoolingParams), else the output is cut to it and normalised when modules.json has a Normalize."""
    config = read(folder, "config.json")
    if dimensions is not None:
        is_matryoshka = bool(config.get("matryoshka_dimensions")) or config.get("is_matryoshka", False)
        if not is_matryoshka or dimensions not in config["matryoshka_dimensions"]:
            raise ValueError(f"only supports {config.get('matryoshka_dimensions')} matryoshka dimensions")
    x, normalize = pooled_and_projected(folder, texts)
    x = x[:, :dimensions]
    return torch.nn.functional.normalize(x, dim=-1).numpy() if normalize else x.numpy()


def tei_embed(folder, texts, dimensions=None, normalize=True):
    """text-embeddings-inference's pipeline: pooled, the Dense modules, `dimensions` (any up to the
    output), then normalised unless the request says `normalize: false` (its default is true)."""
    x, _ = pooled_and_projected(folder, texts)
    assert dimensions is None or dimensions <= x.shape[1]
    x = x[:, :dimensions]
    return torch.nn.functional.normalize(x, dim=-1).numpy() if normalize else x.numpy()


def test_vllm_gives_the_starbucks_vector_at_every_dimension_it_accepts(saved):
    model_dir, folders, expected = saved
    model = StarbucksModel.from_pretrained(model_dir, "cpu")
    for name, folder in folders.items():
        layers = read(folder, "config.json")["num_hidden_layers"]
        assert layers == (4 if name == "checkpoint" else model.size(name).layers)  # an export cuts layers
        np.testing.assert_allclose(
            vllm_embed(folder, TEXTS), model.encode(TEXTS, f"{layers}x{expected[name][-1]}"), atol=1e-5
        )
        for d in expected[name]:
            want = model.encode(TEXTS, f"{layers}x{d}")  # cut, then normalised when the model normalises
            np.testing.assert_allclose(vllm_embed(folder, TEXTS, d), want, atol=1e-5, err_msg=f"{name} {d}")
        # refused: a dim of a size of other layers (the server would cut it from the wrong layer), or none
        for d in {s.dim for s in model.sizes if s.dim < expected[name][-1]} - set(expected[name]) | {7}:
            with pytest.raises(ValueError, match="matryoshka dimensions"):
                vllm_embed(folder, TEXTS, d)


def test_tei_accepts_the_layout_and_gives_the_starbucks_vector(saved):
    from tokenizers import Tokenizer

    model_dir, folders, expected = saved
    model = StarbucksModel.from_pretrained(model_dir, "cpu")
    for name, folder in folders.items():
        config = read(folder, "config.json")  # router/src/lib.rs ModelConfig
        assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
        assert not config["architectures"][0].endswith("Classification")  # else TEI serves a classifier
        assert isinstance(config["max_position_embeddings"], int)
        Tokenizer.from_file(str(folder / "tokenizer.json"))  # a fast tokenizer, which TEI requires
        assert (folder / "model.safetensors").is_file()
        pooling = read(folder, "1_Pooling/config.json")  # PoolConfig: cls or mean
        assert (pooling["pooling_mode_cls_token"], pooling["pooling_mode_mean_tokens"]) == (
            model.pooling == "cls",
            model.pooling == "mean",
        )
        assert read(folder, "sentence_bert_config.json")["max_seq_length"] == 16  # STConfig: the passage length
        prompts = read(folder, "config_sentence_transformers.json")["prompts"]  # NewSTConfig: str -> str
        assert prompts == {"query": "query: ", "document": "passage: "}
        for module in read(folder, "modules.json"):  # parsed as a whole: one unknown type drops every Dense
            assert module["type"] in TEI_MODULE_TYPES and isinstance(module["idx"], int)
            assert isinstance(module["name"], str) and isinstance(module["path"], str)
        layers, dim = config["num_hidden_layers"], expected[name][-1]
        normalize = model.normalize  # a dot-product model is served with normalize: false in each request
        np.testing.assert_allclose(
            tei_embed(folder, TEXTS, normalize=normalize), model.encode(TEXTS, f"{layers}x{dim}"), atol=1e-5
        )
        for d in expected[name]:
            np.testing.assert_allclose(
                tei_embed(folder, TEXTS, d, normalize=normalize), model.encode(TEXTS, f"{layers}x{d}"), atol=1e-5
            )


def test_sentence_transformers_finds_every_module_folder_and_the_exports_dim(saved, tmp_path):
    model_dir, folders, expected = saved
    model = StarbucksModel.from_pretrained(model_dir, "cpu")
    for name, folder in folders.items():
        modules = read(folder, "modules.json")
        assert all((folder / m["path"]).is_dir() for m in modules), modules
        loaded = st.SentenceTransformer(str(folder), device="cpu")
        layers, dim = read(folder, "config.json")["num_hidden_layers"], expected[name][-1]
        assert loaded.get_embedding_dimension() == dim
        assert loaded.truncate_dim == (dim if dim < 32 else None)  # a no-op after the slice
        np.testing.assert_allclose(loaded.encode(TEXTS), model.encode(TEXTS, f"{layers}x{dim}"), atol=1e-5)
        # what sentence-transformers itself writes for these modules: the same folders, the same truncate_dim
        again = tmp_path / name
        loaded.save(str(again))
        assert [m["path"] for m in read(again, "modules.json")] == [m["path"] for m in modules]
        for m in modules:
            if m["path"] and m["type"].endswith("Normalize"):
                assert read(again / m["path"], "config.json") == read(folder / m["path"], "config.json")
        ours, theirs = (
            read(folder, "config_sentence_transformers.json"),
            read(again, "config_sentence_transformers.json"),
        )
        assert ours.get("truncate_dim") == theirs.get("truncate_dim")


def test_a_resave_leaves_no_module_folder_of_the_old_layout(tmp_path):
    folder = save_tiny(tmp_path / "m", [{"name": "half", "layers": 4, "dim": 16}], normalize=True)
    assert (folder / "2_Dense").is_dir() and (folder / "3_Normalize").is_dir()
    save_tiny(folder, DIAGONAL, normalize=True)  # full width now: no slice, Normalize is module 2
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["1_Pooling", "2_Normalize"]
    save_tiny(folder, DIAGONAL, normalize=False)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["1_Pooling"]
    assert [m["path"] for m in read(folder, "modules.json")] == ["", "1_Pooling"]


def test_exported_from_is_an_absolute_path(tmp_path, monkeypatch):
    save_tiny(tmp_path / "runs" / "model", DIAGONAL)
    monkeypatch.chdir(tmp_path)
    export("runs/model", ["mid"], "mid")  # relative paths, as a user types them
    assert read(tmp_path / "mid", "starbucks.json")["exported_from"] == str((tmp_path / "runs" / "model").resolve())
    export("mid", ["mid"], "mid-again")  # an export of an export keeps the first size list
    assert read(tmp_path / "mid-again", "starbucks.json")["source_sizes"] == DIAGONAL
    assert source_path("someone/model-on-the-hub") == "someone/model-on-the-hub"


def test_starbucks_help_shows_each_commands_own_usage(capsys):
    from starbucks_cli import COMMANDS, USAGE, main

    main(["--help"])
    listing = capsys.readouterr().out
    assert "[--config FILE] [key=value ...]" not in listing.splitlines()[0]  # not every command takes a config
    for name, (module, _) in COMMANDS.items():
        assert f"starbucks {name} {USAGE[name]}" in listing
        with pytest.raises(SystemExit) as done:
            importlib.import_module(module).main(["--help"])
        assert done.value.code == 0
        real = capsys.readouterr().out.split("\n\n")[0]  # the command's own usage block
        flags = set(re.findall(r"--[a-z][a-z-]*", USAGE[name]))
        assert flags <= set(re.findall(r"--[a-z][a-z-]*", real)), (name, real)
        assert ("key=value" in USAGE[name]) == ("key=value" in real), (name, real)
        assert ("[options]" in USAGE[name]) == bool(set(re.findall(r"--[a-z][a-z-]*", real)) - flags - {"--help"})
