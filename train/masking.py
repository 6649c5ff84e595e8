"""Pre-training text: sources, packing into fixed-length windows, whole-word masking.

- `iter_texts(source)`: plain texts from a local `.txt` (one text per line), a `.jsonl` with a
  text field, a BEIR corpus (directory, `corpus.jsonl`/`.tsv`, `irds:<id>`; title and text
  joined), any of them `.gz`, or `hf:<dataset id>` streamed with `datasets`.
- `WindowPacker` / `pack_windows`: one token stream (each text followed by SEP) cut into
  windows `[CLS] <max_length-2 tokens> [SEP]`; each token carries a word-start flag (1 where a
  word or a special token begins), so whole words can be masked; a word cut by a window edge
  becomes two words.
- `build_windows(directory, ...)`: packs a source once into memory-mapped token files (resumable
  after a kill; rebuilt when the source or tokenizer changes); `WindowDataset` reads them, with
  items keyed by `(index, epoch)` like the trainer's other datasets.
- `SMAECollator`: two independent whole-word maskings of every window, ratio `enc_ratio` for the
  encoder input and `dec_ratio` for the decoder input. Each word is masked with probability
  `ratio` (so the expected share of masked tokens is exactly `ratio`); special tokens and
  padding are never masked. Masked tokens become [MASK] (`replace: mask`) or, BERT-style
  (`replace: bert`), [MASK] 80%, a random token 10%, unchanged 10% of the time. The masks of
  a batch are a pure function of `(seed, its items' keys)`, so a resumed run masks alike.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from retrieval.data import HF, IRDS, iter_corpus
from retrieval.errors import StarbucksError
from retrieval.io import atomic_write_json, open_text, read_jsonl
from retrieval.seeds import derive_seed

IGNORE = -100  # label of positions without a loss
REPLACE_MODES = ("bert", "mask")
TOKENIZE_CHUNK = 256  # texts per tokenizer call
COMMIT_EVERY = 64  # tokenizer chunks between resumable commits of `build_windows`


# ---------------------------------------------------------------- text sources


def _is_beir_corpus(path: Path) -> bool:
    return path.is_dir() or path.name.split(".")[0] == "corpus" or ".tsv" in path.name


def iter_texts(
    source: str,
    text_field: str = "text",
    hf_config: str | None = None,
    hf_split: str = "train",
    max_texts: int | None = None,
) -> Iterator[str]:
    """Stream the non-empty texts of a pre-training source (see the module docstring)."""
    texts = (t.strip() for t in _iter_source(str(source), text_field, hf_config, hf_split) if isinstance(t, str))
    return itertools.islice((t for t in texts if t), max_texts)


def _iter_source(source: str, text_field: str, hf_config: str | None, hf_split: str) -> Iterator[str]:
    if source.startswith(HF):
        yield from _iter_hf(source[len(HF) :], text_field, hf_config, hf_split)
        return
    if source.startswith(IRDS) or _is_beir_corpus(Path(source)):
        yield from (text for _, text in iter_corpus(source))
        return
    path = Path(source)
    if not path.is_file():
        raise StarbucksError(
            f"pre-training text {path} not found; set pretrain.text to a .txt/.jsonl[.gz] file, a BEIR corpus or hf:<id>"
        )
    if ".jsonl" in path.name:
        for lineno, row in read_jsonl(path, "pre-training text"):
            if text_field not in row:
                raise StarbucksError(f"{path} line {lineno}: no '{text_field}' field; set pretrain.text_field")
            yield row[text_field]
    else:
        with open_text(path, "pre-training text") as f:
            yield from f


def _iter_hf(dataset_id: str, text_field: str, hf_config: str | None, hf_split: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a declared dependency
        raise StarbucksError("the `datasets` package is needed for hf: sources; pip install datasets") from None
    stream = datasets.load_dataset(dataset_id, name=hf_config, split=hf_split, streaming=True)
    for i, row in enumerate(stream):
        if text_field not in row:
            raise StarbucksError(
                f"hf:{dataset_id} row {i} has no '{text_field}' field (fields: {', '.join(row)}); set pretrain.text_field"
            )
        yield row[text_field]


# ---------------------------------------------------------------- packing


class WindowPacker:
    """Turns batches of texts into `(input_ids, word_starts)` windows of `max_length` tokens."""

    def __init__(self, tokenizer, max_length: int, leftover: dict | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise StarbucksError("whole-word masking needs a fast (Rust) tokenizer; the model's tokenizer is not one")
        if max_length < 8:
            raise StarbucksError(f"pretrain.max_length = {max_length} is too short; use at least 8 tokens")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise StarbucksError("the tokenizer has no CLS/SEP tokens; SMAE needs a BERT-style encoder tokenizer")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.ids: list[int] = list((leftover or {}).get("ids", []))
        self.starts: list[int] = list((leftover or {}).get("starts", []))

    def add(self, texts: Sequence[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Append `texts` (each followed by SEP) to the stream; yield the windows now complete."""
        tok = self.tokenizer
        enc = tok(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)
        for i, text_ids in enumerate(enc["input_ids"]):
            words = enc.word_ids(i)
            self.ids.extend(text_ids)
            self.ids.append(tok.sep_token_id)
            self.starts.extend(int(w is None or j == 0 or w != words[j - 1]) for j, w in enumerate(words))
            self.starts.append(1)
        body = self.max_length - 2
        while len(self.ids) >= body:
            ids = np.array([tok.cls_token_id, *self.ids[:body], tok.sep_token_id], dtype=np.int64)
            starts = np.array([1, *self.starts[:body], 1], dtype=np.uint8)
            del self.ids[:body], self.starts[:body]
            yield ids, starts

    def leftover(self) -> dict:
        """The tokens not yet in a window (to resume packing)."""
        return {"ids": list(self.ids), "starts": list(self.starts)}


def pack_windows(texts: Iterable[str], tokenizer, max_length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All complete windows of `texts` (the last partial window is dropped)."""
    packer = WindowPacker(tokenizer, max_length)
    texts = iter(texts)
    while chunk := list(itertools.islice(texts, TOKENIZE_CHUNK)):
        yield from packer.add(chunk)


_IDS, _STARTS, _META, _PROGRESS = "input_ids.bin", "word_starts.bin", "meta.json", "progress.json"


def build_windows(
    directory: str | os.PathLike,
    texts: Callable[[], Iterable[str]],
    tokenizer,
    max_length: int,
    identity: dict,
    max_tokens: int | None = None,
) -> "WindowDataset":
    """Pack `texts()` into `directory` (once) and return its dataset.

    `identity` (source, tokenizer, ...) names what is packed: a finished directory with the same
    identity is reused, another is rebuilt; a killed build resumes from its last commit.
    """
    directory = Path(directory)
    identity = json.loads(json.dumps({**identity, "max_length": max_length, "max_tokens": max_tokens}))
    meta = _read_json(directory / _META)
    if meta is not None and meta["identity"] == identity:
        return WindowDataset(directory)
    progress = _read_json(directory / _PROGRESS)
    if progress is None or progress["identity"] != identity:
        shutil.rmtree(directory, ignore_errors=True)
        progress = {"identity": identity, "texts": 0, "windows": 0, "leftover": {}}
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32
    packer = WindowPacker(tokenizer, max_length, progress["leftover"])
    windows, consumed = progress["windows"], progress["texts"]
    limit = None if max_tokens is None else -(-int(max_tokens) // max_length)  # windows
    stream = itertools.islice(texts(), consumed, None)
    bar = tqdm(
        desc=f"pack windows of {max_length} tokens",
        unit="tok",
        unit_scale=True,
        initial=windows * max_length,
        total=None if limit is None else limit * max_length,
    )
    with open(directory / _IDS, "ab") as ids_file, open(directory / _STARTS, "ab") as starts_file:
        for f, itemsize in ((ids_file, np.dtype(dtype).itemsize), (starts_file, 1)):
            f.truncate(windows * max_length * itemsize)  # drop what was written after the last commit

        def commit() -> None:
            ids_file.flush()
            starts_file.flush()
            atomic_write_json(
                directory / _PROGRESS,
                {"identity": identity, "texts": consumed, "windows": windows, "leftover": packer.leftover()},
            )

        chunks = 0
        while limit is None or windows < limit:
            chunk = list(itertools.islice(stream, TOKENIZE_CHUNK))
            if not chunk:
                break
            for ids, starts in packer.add(chunk):
                if limit is not None and windows >= limit:
                    break
                ids_file.write(ids.astype(dtype).tobytes())
                starts_file.write(starts.tobytes())
                windows += 1
                bar.update(max_length)
            consumed += len(chunk)
            chunks += 1
            if chunks % COMMIT_EVERY == 0:
                commit()
        commit()
    bar.close()
    if windows == 0:
        raise StarbucksError(
            f"{identity.get('source', 'the text')} gives fewer tokens than one window of "
            f"{max_length}; add text or lower pretrain.max_length"
        )
    atomic_write_json(
        directory / _META,
        {"identity": identity, "windows": windows, "max_length": max_length, "dtype": np.dtype(dtype).name},
    )
    (directory / _PROGRESS).unlink()
    return WindowDataset(directory)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class WindowDataset(Dataset):
    """The windows of a `build_windows` directory (memory-mapped); item `(index, epoch)`."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        meta = _read_json(directory / _META)
        if meta is None:
            raise StarbucksError(f"{directory} holds no finished windows; re-run pre-training to build them")
        shape = (int(meta["windows"]), int(meta["max_length"]))
        self.directory = directory
        self.input_ids = np.memmap(directory / _IDS, dtype=meta["dtype"], mode="r", shape=shape)
        self.word_starts = np.memmap(directory / _STARTS, dtype=np.uint8, mode="r", shape=shape)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, _ = key
        return {
            "input_ids": torch.from_numpy(self.input_ids[index].astype(np.int64)),
            "word_starts": torch.from_numpy(self.word_starts[index].astype(np.int64)),
            "key": tuple(key),
        }


# ---------------------------------------------------------------- masking


def whole_word_mask(
    word_ids: torch.Tensor, maskable: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A `(B, T)` bool mask: each word of each row (one `word_ids` value) is masked with probability `ratio`.

    All pieces of a word share one draw; positions where `maskable` is False are never masked.
    """
    rows = torch.arange(word_ids.shape[0]).unsqueeze(1).expand_as(word_ids)
    keys = rows * (int(word_ids.max().clamp(min=0)) + 1) + word_ids.clamp(min=0)
    unique, inverse = torch.unique(keys, return_inverse=True)
    draws = torch.rand(len(unique), generator=generator) < ratio
    return draws[inverse] & maskable


class SMAECollator:
    """Batches windows into encoder and decoder inputs with two independent whole-word maskings.

    Items are `{input_ids, word_starts, key}` (see `WindowDataset`). Output: `input_ids`,
    `attention_mask`, `labels` (encoder), `decoder_input_ids`, `decoder_labels`; labels hold the
    original token at masked positions, -100 elsewhere. Rows of different lengths are padded.
    """

    def __init__(self, tokenizer, enc_ratio: float = 0.2, dec_ratio: float = 0.4, replace: str = "bert", seed: int = 0):
        for name, ratio in (("enc_mask_ratio", enc_ratio), ("dec_mask_ratio", dec_ratio)):
            if not 0.0 < ratio < 1.0:
                raise StarbucksError(f"pretrain.{name} = {ratio} must be between 0 and 1 (exclusive)")
        if replace not in REPLACE_MODES:
            raise StarbucksError(f"pretrain.mask_replace = {replace!r} is not one of {', '.join(REPLACE_MODES)}")
        if tokenizer.mask_token_id is None:
            raise StarbucksError("the tokenizer has no [MASK] token; SMAE needs an MLM tokenizer")
        self.enc_ratio = float(enc_ratio)
        self.dec_ratio = float(dec_ratio)
        self.replace = replace
        self.seed = int(seed)
        self.mask_id = int(tokenizer.mask_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.vocab_size = len(tokenizer)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def generator(self, items: Sequence[dict]) -> torch.Generator:
        """A generator seeded by `(seed, the items' keys)`: the same batch always gets the same masks."""
        return torch.Generator().manual_seed(derive_seed(self.seed, *(tuple(i["key"]) for i in items)))

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(w["input_ids"]) for w in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        word_starts = torch.ones((len(items), length), dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, w in enumerate(items):
            n = len(w["input_ids"])
            input_ids[i, :n] = torch.as_tensor(w["input_ids"])
            word_starts[i, :n] = torch.as_tensor(w["word_starts"])
            attention_mask[i, :n] = 1
        word_ids = word_starts.cumsum(1)
        maskable = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        generator = self.generator(items)
        enc_ids, enc_labels = self.corrupt(
            input_ids, whole_word_mask(word_ids, maskable, self.enc_ratio, generator), generator
        )
        dec_ids, dec_labels = self.corrupt(
            input_ids, whole_word_mask(word_ids, maskable, self.dec_ratio, generator), generator
        )
        return {
            "input_ids": enc_ids,
            "attention_mask": attention_mask,
            "labels": enc_labels,
            "decoder_input_ids": dec_ids,
            "decoder_labels": dec_labels,
        }

    def corrupt(
        self, input_ids: torch.Tensor, masked: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the masked positions (per `replace`); labels keep the original token there."""
        labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE))
        corrupted = input_ids.clone()
        if self.replace == "mask":
            corrupted[masked] = self.mask_id
            return corrupted, labels
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = masked & (draw < 0.8)
        to_random = masked & (draw >= 0.8) & (draw < 0.9)
        corrupted[to_mask] = self.mask_id
        corrupted[to_random] = torch.randint(self.vocab_size, (int(to_random.sum()),), generator=generator)
        return corrupted, labels
