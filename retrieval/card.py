"""The model card: `README.md` beside a saved model.

It holds the sizes table (layers, dims, bytes per passage), how the model was trained, per-size
results once `eval` has run for it, how to load it (this toolkit, sentence-transformers), and
the paper's citation; the hub metadata (library_name, tags, base_model, model-index) is its YAML
front matter. `write_card` runs whenever a model is saved; `refresh_card` adds the results that
`eval` wrote (`<eval>/<split>.json`), kept beside the model in `starbucks-eval.json`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import yaml

from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json, atomic_write_text
from retrieval.sizes import Size, SizeList, meta_sizes
from retrieval.tables import markdown_table

CARD_FILE = "README.md"
RESULTS_FILE = "starbucks-eval.json"
PAPER = "https://arxiv.org/abs/2410.13230"
CITATION = """@article{zhuang2024starbucks,
  title   = {Starbucks: Improved Training for 2D Matryoshka Embeddings},
  author  = {Zhuang, Shengyao and Wang, Shuai and Zheng, Fabio and Koopman, Bevan and Zuccon, Guido},
  journal = {arXiv preprint arXiv:2410.13230},
  year    = {2024}
}"""
TAGS = [
    "sentence-transformers",
    "sentence-similarity",
    "feature-extraction",
    "dense-retrieval",
    "starbucks",
    "matryoshka",
    "2d-matryoshka",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MTEB_ORG = "local"  # the organisation part of a local model's name (`size_model_name`)


def _sizes(meta: Mapping, shape: tuple[int, int]) -> SizeList:
    return meta_sizes(meta) or SizeList([Size("", *shape)])


def _metric_type(measure: str) -> str:
    """`nDCG@10` -> `ndcg_at_10` (the hub's metric type spelling)."""
    return re.sub(r"[^a-z0-9]+", "_", measure.lower().replace("@", "_at_")).strip("_")


def read_results(directory: str | os.PathLike) -> dict:
    """The per-split results kept beside a model (`{}` before any eval)."""
    p = Path(directory) / RESULTS_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def _front_matter(name: str, meta: Mapping, results: Mapping) -> str:
    front: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity", "tags": TAGS}
    base = str(meta.get("base_model") or "")
    if _HUB_ID.match(base) and not os.path.exists(base):
        front["base_model"] = base
    entries = []
    for split, r in results.items():
        metrics = [
            {
                "type": _metric_type(m),
                "name": f"{m} {s['size']} ({s['layers']}x{s['dim']})",
                "value": round(float(s["metrics"][m]), 4),
            }
            for s in r["sizes"]
            for m in r["measures"]
            if m in s["metrics"]
        ]
        entries.append(
            {
                "task": {"type": "retrieval", "name": "Retrieval"},
                "dataset": {"name": split, "type": str(r.get("collection") or split)},
                "metrics": metrics,
            }
        )
    if entries:
        front["model-index"] = [{"name": name, "results": entries}]
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True) + "---\n"


def card_name(directory: str | os.PathLike, meta: Mapping) -> str:
    """The card's name for the model in `directory`: its training config's name, else the directory's;
    an export adds its size (`<name>-<size>`)."""
    name = str((meta.get("config") or {}).get("name") or Path(directory).name)
    exported = meta.get("exported_size")
    return f"{name}-{exported['name']}" if exported else name


def _folder_name(path: str | os.PathLike) -> str:
    """A model folder's name; a trained model's (`runs/<name>/model`) is its run's."""
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def size_model_name(source: str | os.PathLike, meta: Mapping, size: Size, base: str | None = None) -> str:
    """The name of the model at `source` (a folder or hub id; `meta` is its `starbucks.json`) when it
    serves `size`, for result caches and leaderboards that key on a model name (MTEB wants `ORG/NAME`):
    `<base>-<size>`, so that every size of a model, and every export, has a name of its own.

    `base` (`ORG/NAME`) defaults to the hub id of a hub model (an export's hub id is already one size's:
    it is the name), else `local/<name>` with the name of the training run (its config's `name`, else
    the folder's, an export's from the folder it was exported from)."""
    if base is None:
        source = str(source)
        if _HUB_ID.match(source) and not os.path.exists(source):
            if meta.get("exported_size"):
                return source
            base = source
        else:
            config = meta.get("config") or {}
            base = f"{MTEB_ORG}/{config.get('name') or _folder_name(meta.get('exported_from') or source)}"
    if "/" not in base:
        raise StarbucksError(f"model name {base!r} needs an organisation: ORG/NAME (e.g. {MTEB_ORG}/{base})")
    return f"{base}-{size.name}"


def _default_id(directory: Path, meta: Mapping) -> str:
    """Where the load examples say the model is: a trained model's place in its experiment (it is
    saved under a temporary name first), else the directory."""
    config = meta.get("config") or {}
    if "exported_from" in meta or not config.get("output_dir"):
        return str(directory)
    return str((config.get("paths") or {}).get("model") or Path(config["output_dir"]) / "model")


def render_card(
    directory: str | os.PathLike,
    meta: Mapping,
    results: Mapping | None = None,
    model_id: str | None = None,
    *,
    shape: tuple[int, int],
) -> str:
    """The card's text for the model in `directory` (its `starbucks.json` is `meta`, its
    `(layers, hidden size)` is `shape`); `model_id` is the name the load examples use (default: the
    directory)."""
    directory = Path(directory)
    results = results or {}
    sizes = _sizes(meta, shape)
    config = meta.get("config") or {}
    name = card_name(directory, meta)
    exported = meta.get("exported_size")
    model_id = model_id or _default_id(directory, meta)
    pooling, normalize = meta.get("pooling", "cls"), bool(meta.get("normalize", False))
    largest, middle = sizes.largest, sizes[len(sizes) // 2]
    parts = [_front_matter(name, meta, results), f"# {name}\n"]
    parts.append(
        f"A [Starbucks]({PAPER}) 2D Matryoshka embedding model: its first `n` layers and first `d` "
        f"dimensions give an embedding for every size below, so one model serves from the smallest to "
        f"the largest size. {pooling.upper() if pooling == 'cls' else 'Mean'} pooling, "
        f"{'L2-normalised (cosine similarity)' if normalize else 'dot product'}; "
        f"{shape[0]} layers, {shape[1]} dims.\n"
    )
    parts.append("## Sizes\n")
    parts.append(
        markdown_table(
            ["size", "layers", "dims", "bytes per passage (fp16)", "bytes per passage (fp32)"],
            [[s.name, s.layers, s.dim, 2 * s.dim, 4 * s.dim] for s in sizes],
        )
        + "\n"
    )
    if results:
        parts.append("## Results\n")
        for split, r in results.items():
            measures = list(r["measures"])
            parts.append(
                f"`{split}`: {r.get('queries', '?')} queries, relevant at level >= "
                f"{r.get('rel_level', '?')} (`python -m eval`).\n"
            )
            parts.append(
                markdown_table(
                    ["size", *measures],
                    [
                        [f"{s['size']} ({s['layers']}x{s['dim']})", *(f"{s['metrics'][m]:.4f}" for m in measures)]
                        for s in r["sizes"]
                    ],
                )
                + "\n"
            )
    parts.append("## Usage\n")
    parts.append(
        "With the `starbucks-retrieval` toolkit, at any size (several from one pass):\n\n"
        "```python\nfrom retrieval import StarbucksModel\n\n"
        f"model = StarbucksModel.from_pretrained({model_id!r})\n"
        f'q = model.encode_queries(["how do I edit a PDF"], size={middle.name!r})  # {middle.key}\n'
        f'p = model.encode_passages(["A PDF editor.", "An IRC client."], size={middle.name!r})\n'
        "print(model.similarity(q, p))\n"
        f'both = model.encode_passages(["A PDF editor."], sizes={sizes.names[:2]!r})  # name -> array\n```\n'
    )
    parts.append(
        f"With sentence-transformers (the {largest} embedding; `encode_query` / `encode_document` add each "
        "side's prefix and max length, as above):\n\n"
        "```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f"model = SentenceTransformer({model_id!r})\n"
        'q = model.encode_query(["how do I edit a PDF"])\n'
        'p = model.encode_document(["A PDF editor.", "An IRC client."])\n'
        "print(model.similarity(q, p))\n```\n"
    )
    if not exported:
        parts.append(
            "A standalone sentence-transformers model of one size (its layers only, the first `d` dims "
            "taken before any normalisation):\n\n"
            f"```bash\npython -m train.export {model_id} --size {sizes[0].name} --out {name}-{sizes[0].name}\n```\n"
        )
    parts.append("## Training\n")
    facts = [
        ("method", meta.get("method")),
        ("base model", meta.get("base_model")),
        ("steps", meta.get("step")),
        ("training data", (config.get("data") or {}).get("train")),
        ("exported from", meta.get("exported_from")),
    ]
    train = config.get("train") or {}
    facts += [
        (k.replace("_", " "), train.get(k))
        for k in ("epochs", "batch_size", "group_size", "learning_rate", "temperature", "kl_weight")
    ]
    lines = [f"- {k}: `{v}`" for k, v in facts if v not in (None, "")]
    parts.append("\n".join(lines or ["- not recorded"]) + "\n")
    if config:
        parts.append(
            "<details><summary>The training config</summary>\n\n```yaml\n"
            + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
            + "```\n</details>\n"
        )
    parts.append(f"## Citation\n\n```bibtex\n{CITATION}\n```\n")
    return "\n".join(parts)


def write_card(
    directory: str | os.PathLike,
    meta: Mapping,
    results: Mapping | None = None,
    model_id: str | None = None,
    *,
    shape: tuple[int, int],
) -> Path:
    """Write `README.md` (and the results it shows) into `directory`."""
    directory = Path(directory)
    results = dict(results or {})
    if results:
        atomic_write_json(directory / RESULTS_FILE, results)
    elif (directory / RESULTS_FILE).exists():
        (directory / RESULTS_FILE).unlink()  # results of other weights than these
    path = directory / CARD_FILE
    atomic_write_text(path, render_card(directory, meta, results, model_id, shape=shape))
    return path
