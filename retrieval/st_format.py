"""sentence-transformers module files, so that `SentenceTransformer(path)` loads a saved model.

The files use the long-standing module names (`sentence_transformers.models.*`). The model's
output is the largest size of its `starbucks.json` when that size runs every layer the model has
(a checkpoint's trenta, an export's one size), else the full width. Where the dim is cut, an
identity-slice `Dense` layer keeps the first `d` dims *before* `Normalize`: ST's `truncate_dim`
cuts after `Normalize`, which gives another vector for a normalised model. Where the dim is cut,
`config_sentence_transformers.json` also records `truncate_dim: d` (what `SentenceTransformer.save`
writes for a model built with `truncate_dim=d`; read back since sentence-transformers 6.0): on the
`d`-dim output of the slice it cuts nothing, so the vector stays the size's, and
`get_embedding_dimension()` and tools that read the setting see the size's dim. A `Normalize` module
gets its folder (`<idx>_Normalize/config.json`), as `SentenceTransformer.save` writes it.

`serving_dims` is the one rule for the dims a server (vLLM's `matryoshka_dimensions`, a
`dimensions` request) may cut a saved model's output to: servers cut dims, never layers.

Queries and passages keep their own lengths, as in `StarbucksModel`: the Transformer's
`query_length` / `document_length` (sentence-transformers >= 6.0) cut `encode_query` at the query
max length and `encode_document` at the passage max length, and the prompts `query` / `document`
are the prefixes; plain `encode` (no task) takes `max_seq_length`, the passage max length, and no
prompt, as `StarbucksModel.encode` does. One Transformer serves both (a `Router` with a route per
side would need a second copy of the weights: the length lives on each route's own module).
Releases before 6.0 refuse the two length keys (`unexpected keyword argument 'query_length'`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Mapping

import torch

from retrieval.config import DEFAULTS
from retrieval.io import atomic_path, atomic_write_json
from retrieval.sizes import Size, SizeList, meta_sizes

POOLING_DIR, DENSE_DIR = "1_Pooling", "2_Dense"
MODULE_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    f"{POOLING_DIR}/config.json",
)


def st_output_dim(num_layers: int, hidden: int, sizes: SizeList | None) -> int:
    """The dims `SentenceTransformer(path)` returns for a model of this shape and size list."""
    if sizes and sizes.largest.layers == num_layers:
        return min(sizes.largest.dim, hidden)
    return hidden


def serving_dims(
    sizes: Iterable[Size] | None, num_layers: int, output_dim: int, method: str | None = None
) -> list[int]:
    """The dims a server may cut the output of a model with `num_layers` layers and `output_dim` dims
    to, ascending: the dims trained at exactly that depth (up to `output_dim`) and `output_dim` itself.
    A server runs every layer the model has and cuts only dims, so a size of fewer layers is none of
    them: a checkpoint trained on a diagonal list (SRL's) serves its full size only, one trained
    width-wise every dim; a one-size export of `(n, d)` (given the size list it was cut from) serves
    `d` and the dims trained at `n` layers below it. The trained sizes are the non-hybrid `sizes`, except
    for two training methods: `full` trains the largest only (it records the list to evaluate it),
    `2dmse` every layer count with every dim of the list (its `(n, d)` and `(N, d)` terms)."""
    sizes = [s for s in sizes or () if not s.parts]
    if method == "full" and sizes:
        sizes = [max(sizes, key=lambda s: (s.layers, s.dim))]
    elif method == "2dmse":
        sizes = [Size(s.name, num_layers, s.dim) for s in sizes]
    trained = {s.dim for s in sizes if s.layers == num_layers and s.dim <= output_dim}
    return sorted(trained | {output_dim})


def st_lengths(meta: Mapping) -> tuple[int, int]:
    """`(query, passage)` max lengths a model with this `starbucks.json` encodes with (the toolkit's
    defaults where it records none, as `StarbucksModel.from_pretrained` reads them)."""
    return tuple(int(meta.get(k) or DEFAULTS["model"][k]) for k in ("query_max_length", "passage_max_length"))


def _builds_a_pooler(directory: Path) -> bool:
    """Whether the saved model's class adds a pooler unless told not to (BERT, RoBERTa, MPNet, ...)."""
    import inspect
    import json

    import transformers

    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or [""]
    model_class = getattr(transformers, architectures[0], None)
    return model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def write_st_modules(directory: str | os.PathLike, meta: Mapping, shape: tuple[int, int]) -> None:
    """Transformer -> Pooling (CLS or mean) -> [first `d` dims] -> [Normalize] for a model of `shape`
    (layers, hidden) whose `starbucks.json` is `meta`, plus the max lengths (plain and document: the
    passage's; query: the query's), the query/passage prompts and the similarity function (`cosine`
    when normalised, else `dot`)."""
    directory = Path(directory)
    num_layers, hidden = shape
    pooling, normalize = meta.get("pooling", "cls"), bool(meta.get("normalize", False))
    dim = st_output_dim(num_layers, hidden, meta_sizes(meta))
    modules = [("", "Transformer"), (POOLING_DIR, "Pooling")]
    atomic_write_json(
        directory / POOLING_DIR / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        },
    )
    dense = directory / DENSE_DIR
    if dim < hidden:
        from safetensors.torch import save_file

        modules.append((DENSE_DIR, "Dense"))
        atomic_write_json(
            dense / "config.json",
            {
                "in_features": hidden,
                "out_features": dim,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        with atomic_path(dense / "model.safetensors") as tmp:
            save_file({"linear.weight": torch.eye(hidden)[:dim].contiguous()}, str(tmp))
    elif dense.is_dir():
        shutil.rmtree(dense)  # a stale slice from an earlier save into this directory
    if normalize:
        modules.append((f"{len(modules)}_Normalize", "Normalize"))
        # the folder and config SentenceTransformer.save writes for Normalize (sentence-transformers >= 6.0)
        atomic_write_json(
            directory / modules[-1][0] / "config.json",
            {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"},
        )
    for stale in directory.glob("*_Normalize"):  # from an earlier save into this directory
        if stale.is_dir() and stale.name not in {path for path, _ in modules}:
            shutil.rmtree(stale)
    atomic_write_json(
        directory / "modules.json",
        [
            {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
            for i, (path, kind) in enumerate(modules)
        ],
    )
    query_length, passage_length = st_lengths(meta)
    # plain encode() (no task): the passage length; encode_query / encode_document: each side's own
    settings = {
        "max_seq_length": passage_length,
        "query_length": query_length,
        "document_length": passage_length,
        "do_lower_case": False,
    }
    if _builds_a_pooler(directory):  # the toolkit saves no pooler: do not build a random one
        settings["model_args"] = {"add_pooling_layer": False}
    atomic_write_json(directory / "sentence_bert_config.json", settings)
    model_config = {
        "prompts": {
            "query": str(meta.get("query_prefix") or ""),
            "document": str(meta.get("passage_prefix") or ""),
        },
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if normalize else "dot",
    }
    if dim < hidden:  # the slice's output dim: a no-op cut after it, recorded as ST records its own
        model_config["truncate_dim"] = dim
    atomic_write_json(directory / "config_sentence_transformers.json", model_config)
