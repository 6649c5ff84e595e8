"""`python -m train.export MODEL --size S --out DIR [--onnx DIR] [--all] [--push-to-hub USER/NAME] [--dry-run]`

Writes a standalone sentence-transformers model of one size: only the size's first `n` layers,
an output that is exactly the size's embedding (the first `d` dims taken before any
normalisation), its own `starbucks.json` (that one size; `exported_from`, the checkpoint's absolute
path or hub id; `source_sizes`, the checkpoint's size list) and model card. Its `config.json` tells
vLLM which dims it may cut the output to (`matryoshka_dimensions`: `d` and the dims trained at `n`
layers below it), and the folder is a layout text-embeddings-inference loads. `--onnx DIR`: the size
as an ONNX graph instead of (or beside) it: `DIR/model.onnx` (`input_ids`, `attention_mask` ->
`embedding`, dynamic batch and sequence axes: the cut layers, the pooling, the first `d` dims,
the normalisation), the tokenizer files and `starbucks_onnx.json` (size, pooling, normalisation,
max lengths, prefixes). `--all`: one folder per size, `DIR/<size>`. `--push-to-hub`: upload the
folder through `huggingface_hub` (the token from `HF_TOKEN` or `huggingface-cli login`; with
`--all`, one repository per size, `NAME-<size>`); without `--size`/`--all` the checkpoint itself
(every size) is uploaded. `--dry-run` prepares the folders and prints what would be uploaded.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from retrieval.card import read_results, write_card
from retrieval.errors import StarbucksError, cli_entry
from retrieval.io import atomic_write_json
from retrieval.model import StarbucksModel
from retrieval.checkpoint import META_FILE, SOURCE_SIZES, model_shape, read_meta
from retrieval.encoder import StarbucksEncoder, tokenize
from retrieval.settings import first_line
from retrieval.sizes import Size, SizeList

__all__ = ["export", "export_size", "export_onnx", "push_to_hub", "ONNX_FILE", "ONNX_META"]
ONNX_FILE = "model.onnx"
ONNX_META = "starbucks_onnx.json"  # what a runtime needs besides the graph and the tokenizer
ONNX_OPSET = 17  # LayerNormalization is one op from 17 on


@dataclass
class ExportResult:
    """The folders written (or the checkpoint pushed) and, per hub repository, the files uploaded."""

    folders: list[Path]
    uploads: dict[str, list[str]] = field(default_factory=dict)


def source_path(source: str) -> str:
    """Where an export came from, as its `starbucks.json` records it: a local folder as an absolute,
    resolved path (the export may be read from anywhere), a hub id as it is."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def export_size(model: StarbucksModel, size: Size, out: str | Path) -> Path:
    """Write `model` cut to `size` (its layers; ST's output: its dims) as a checkpoint in `out`."""
    size = model.size(size)
    if size.parts:
        raise StarbucksError(
            f"{size.key} is a hybrid of {len(size.parts)} sizes, which one sentence-transformers model "
            f"cannot give; export each part (--size {size.parts[0].size.key}, ...)"
        )
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise StarbucksError(f"{out} exists and is not a model folder; give an empty or new --out")
    encoder = copy.deepcopy(model.encoder).truncate_(size.layers)
    cut = StarbucksModel(
        encoder,
        model.tokenizer,
        SizeList([size]),
        query_max_length=model.query_max_length,
        passage_max_length=model.passage_max_length,
        query_prefix=model.query_prefix,
        passage_prefix=model.passage_prefix,
        source=model.source,
        meta=model.meta,
    )
    source_sizes = model.meta.get(SOURCE_SIZES) or model.sizes.to_config()  # an export of an export: the first list
    cut.save(
        out, {"exported_from": source_path(model.source), "exported_size": size.to_dict(), SOURCE_SIZES: source_sizes}
    )
    results = {
        split: {
            **r,
            "sizes": [
                s for s in r["sizes"] if (s["layers"], s["dim"]) == (size.layers, size.dim) and "+" not in s["size"]
            ],
        }  # a hybrid may share a size's layers and dim
        for split, r in read_results(model.source).items()
    }
    results = {split: r for split, r in results.items() if r["sizes"]}
    if results:
        write_card(out, read_meta(out), results, shape=model_shape(str(out)))
    return out


class _OneSize(torch.nn.Module):
    """The graph an ONNX export traces: `(input_ids, attention_mask)` -> one size's embedding, through
    the encoder's own plain path (`hidden_states` of the cut model, `pool`: dims cut, normalised)."""

    def __init__(self, encoder: StarbucksEncoder, size: Size):
        super().__init__()
        self.encoder, self.size = encoder, size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        states = self.encoder.hidden_states(batch, [self.size.layers])[self.size.layers]
        return self.encoder.pool(states, attention_mask, self.size.dim)


def export_onnx(model: StarbucksModel, size: Size | str, out: str | Path) -> Path:
    """Write `model` at `size` as an ONNX graph (`out/model.onnx`, fp32, ONNX opset 17) with the
    tokenizer files and `starbucks_onnx.json` beside it. The graph takes right-padded `input_ids` and
    `attention_mask` (int64, batch x sequence, any batch size and length up to the model's positions)
    and returns the `embedding` (float32, batch x dim) that `encode_queries` / `encode_passages` give
    for the same tokens; a runtime adds the side's prefix and cuts at its max length as they do."""
    try:
        import onnx  # noqa: F401  (torch's exporter writes the graph through it)
    except ImportError:
        raise StarbucksError("ONNX export needs the onnx package: pip install 'starbucks-retrieval[onnx]'") from None
    size = model.size(size)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / ONNX_META).is_file():
        raise StarbucksError(f"{out} exists and is not an ONNX export; give an empty or new --onnx")
    out.mkdir(parents=True, exist_ok=True)
    encoder = copy.deepcopy(model.encoder).truncate_(size.layers).float().cpu().eval()
    # a batch with padding, so that the graph applies the attention mask (a mask of ones may be skipped)
    example = tokenize(model.tokenizer, ["a", "two words"], max(model.passage_max_length, 8))
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, tracer notes on shapes
        torch.onnx.export(
            _OneSize(encoder, size),
            (example["input_ids"], example["attention_mask"]),
            str(out / ONNX_FILE),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            opset_version=ONNX_OPSET,
            dynamo=False,
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
        )
    model.tokenizer.save_pretrained(out)
    atomic_write_json(
        out / ONNX_META,
        {
            "format_version": 1,
            "file": ONNX_FILE,
            "size": size.to_dict(),
            "pooling": model.pooling,
            "normalize": model.normalize,
            "similarity": model.similarity_fn_name,
            "query_max_length": model.query_max_length,
            "passage_max_length": model.passage_max_length,
            "query_prefix": model.query_prefix,
            "passage_prefix": model.passage_prefix,
            "inputs": {"input_ids": "int64 [batch, sequence]", "attention_mask": "int64 [batch, sequence], 1 = token"},
            "output": {"embedding": f"float32 [batch, {size.dim}]"},
            "padding": "right",
            "opset": ONNX_OPSET,
            "exported_from": source_path(model.source),
        },
    )
    return out


def upload_files(folder: Path) -> list[str]:
    """The files of `folder` an upload sends (hidden and temporary files left out), sorted."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def push_to_hub(
    folder: str | Path, repo_id: str, dry_run: bool = False, private: bool = False, own_folder: bool = True
) -> list[str]:
    """Upload `folder` to the hub model repository `repo_id` (created if missing); its card's load
    examples name `repo_id`. `dry_run`: only list the files. `own_folder=False` (the trained checkpoint
    itself, not an export): a dry run leaves its card as it is. Returns the files (relative paths)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if meta is None:
        raise StarbucksError(f"{folder} has no {META_FILE}: push a model saved by this toolkit")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise StarbucksError(f"--push-to-hub {repo_id!r} is not a hub repository id such as user/name")
    if own_folder or not dry_run:  # a dry run changes nothing in the user's checkpoint
        write_card(folder, meta, read_results(folder), model_id=repo_id, shape=model_shape(str(folder)))
    files = upload_files(folder)
    total = sum((folder / f).stat().st_size for f in files)
    verb = "would upload" if dry_run else "uploading"
    print(
        f"export: {verb} {len(files)} files ({total / 1e6:.1f} MB) from {folder} to https://huggingface.co/{repo_id}:",
        file=sys.stderr,
    )
    for f in files:
        print(f"  {f}")
    if dry_run:
        return files
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder),
            allow_patterns=files,
            commit_message=f"Upload {meta.get('exported_size', {}).get('name') or 'model'} with starbucks-retrieval",
        )
    except (HfHubHTTPError, OSError) as err:
        raise StarbucksError(
            f"upload to {repo_id} failed: {first_line(err)}; check HF_TOKEN (or huggingface-cli login) and the network"
        ) from None
    return files


def export(
    model_path: str,
    sizes: Sequence[str] | None = None,
    out: str | Path | None = None,
    push: str | None = None,
    dry_run: bool = False,
    private: bool = False,
    device: str | None = None,
    onnx: str | Path | None = None,
) -> ExportResult:
    """Export `sizes` (names or `LxD`; `["all"]`: every size of the checkpoint) of the checkpoint at
    `model_path` into `out` (one size: `out` itself; several: `out/<size>`), then push each folder
    to the hub when `push` is given; without `sizes`, push the checkpoint as it is. `onnx`: also (or
    only, without `out`) an ONNX graph of each size there, laid out the same way (`export_onnx`)."""
    if not sizes:
        if not push:
            raise StarbucksError(
                "nothing to do: give --size S --out DIR (or --onnx DIR), --all --out DIR, or --push-to-hub USER/NAME"
            )
        StarbucksModel.from_pretrained(model_path, "cpu")  # one clear line if it is not a model
        result = ExportResult([Path(model_path)])
        result.uploads[push] = push_to_hub(model_path, push, dry_run, private, own_folder=False)
        return result
    if out is None and onnx is None:
        raise StarbucksError(
            "give --out DIR (a sentence-transformers model) or --onnx DIR (an ONNX graph): "
            "where the exported model goes"
        )
    if push and out is None:
        raise StarbucksError("--push-to-hub uploads the --out folders; give --out DIR too")
    model = StarbucksModel.from_pretrained(model_path, device or "cpu")
    wanted = list(model.sizes) if list(sizes) == ["all"] else [model.size(s) for s in sizes]
    one = len(wanted) == 1 and list(sizes) != ["all"]
    result = ExportResult([])
    for size in wanted:
        if onnx is not None:
            graph = export_onnx(model, size, Path(onnx) if one else Path(onnx) / size.name)
            print(f"export: {size} -> {graph / ONNX_FILE}", file=sys.stderr)
            result.folders.append(graph)
        if out is None:
            continue
        folder = export_size(model, size, Path(out) if one else Path(out) / size.name)
        print(f"export: {size} -> {folder}", file=sys.stderr)
        result.folders.append(folder)
        if push:
            repo = push if one else f"{push}-{size.name}"
            result.uploads[repo] = push_to_hub(folder, repo, dry_run, private)
    return result


@cli_entry
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("model", help="a checkpoint of this toolkit (runs/<name>/model)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--size", help="the size to export: a name (grande) or LAYERSxDIM (8x256)")
    which.add_argument("--all", action="store_true", help="every size of the checkpoint, one folder each")
    parser.add_argument("--out", help="where the exported model goes (with --all: one sub-folder per size)")
    parser.add_argument(
        "--onnx",
        metavar="DIR",
        help="write the size as an ONNX graph (DIR/model.onnx, the tokenizer, "
        "starbucks_onnx.json; with --all: one sub-folder per size)",
    )
    parser.add_argument("--push-to-hub", metavar="USER/NAME", help="upload to this hub model repository")
    parser.add_argument("--private", action="store_true", help="create the hub repository private")
    parser.add_argument("--dry-run", action="store_true", help="prepare the folders, list what would be uploaded")
    parser.add_argument("--device", default="cpu", help="where the model is loaded for the cut (default: cpu)")
    args = parser.parse_args(argv)
    sizes = ["all"] if args.all else [args.size] if args.size else None
    export(args.model, sizes, args.out, args.push_to_hub, args.dry_run, args.private, args.device, args.onnx)


if __name__ == "__main__":
    main()
