"""The embedding store: one directory per size of float16 `.npy` shards, ids and `meta.json`.

```
<embeddings>/<size-name>/meta.json            model, size, dtype, pooling, normalisation, count, ids hash
<embeddings>/<size-name>/shard-00000.npy      float16 (rows, dim): passages [0, shard_rows)
<embeddings>/<size-name>/ids-00000.txt        their ids, one a line
<embeddings>/<size-name>/texts-00000.sha256   sha256 of their texts (an edited text re-encodes its shard)
<embeddings>/<size-name>/queries-<split>.npy  float16 (queries, dim), with .ids.txt and .json
```
Shard `k` always holds corpus positions `[k * shard_rows, (k + 1) * shard_rows)`, whoever wrote
it, so workers that encode disjoint sets of shards (`--shard i/n`, torchrun ranks) together
write exactly the store a single process writes. A shard is complete once its `.npy` exists
(written atomically after its ids). `meta.json` is created when encoding starts (identity only)
and gains `count`, `ids_sha256`, `texts_sha256` and `complete: true` when every shard is present.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from retrieval.errors import StarbucksError
from retrieval.io import atomic_path, atomic_write_json, atomic_write_text, writing
from retrieval.names import parse_names
from retrieval.settings import first_line
from retrieval.sizes import Size, hybrid_key, recorded_size

STORE_VERSION = 1
META_FILE = "meta.json"
DTYPE = "float16"
_SHARD = re.compile(r"^shard-(\d{5,})\.npy$")

# Fields that must agree between a passage store and query embeddings searched against it.
COMPATIBLE_FIELDS = ("model_sha256", "layers", "dim", "pooling", "normalize")
# Fields of a passage store that an index or a run made from it records (a change makes them stale).
PASSAGE_FIELDS = (
    "model_sha256",
    "pooling",
    "normalize",
    "max_length",
    "prefix",
    "precision",
    "ids_sha256",
    "texts_sha256",
    "count",
)


def embedding_identity(
    model_sha256: str, size: Size, pooling: str, normalize: bool, max_length: int, prefix: str, precision: str
) -> dict:
    """What embeddings of one size record about how they were made; a resumed encode must match it all
    (`precision`, the resolved one: shards of one store are never half fp32, half bf16)."""
    return {
        "model_sha256": model_sha256,
        "size": size.name,
        "layers": size.layers,
        "dim": size.dim,
        "pooling": pooling,
        "normalize": bool(normalize),
        "max_length": int(max_length),
        "prefix": prefix,
        "precision": precision,
    }


class IdsHasher:
    """Incremental sha256 over ids, each followed by a newline (= the concatenated ids files)."""

    def __init__(self):
        self._sha = hashlib.sha256()
        self.count = 0

    def update(self, ids: Iterable[str]) -> "IdsHasher":
        for i in ids:
            self._sha.update(i.encode("utf-8") + b"\n")
            self.count += 1
        return self

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def ids_sha256(ids: Iterable[str]) -> str:
    return IdsHasher().update(ids).hexdigest()


def texts_sha256(texts: Iterable[str]) -> str:
    """sha256 of passage texts, each followed by a NUL (texts may hold newlines)."""
    sha = hashlib.sha256()
    for t in texts:
        sha.update(t.encode("utf-8") + b"\0")
    return sha.hexdigest()


def model_fingerprint(module) -> str:
    """sha256 of a torch module's parameters and buffers (names, shapes, dtypes, raw bytes)."""
    import torch

    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        sha.update(f"{name}:{tuple(tensor.shape)}:{t.dtype}\n".encode())
        sha.update(t.view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def check_ids(ids: Sequence[str], where: str) -> None:
    """Ids go into TREC run files: no whitespace, not empty."""
    for i in ids:
        if not i or any(c.isspace() for c in i):
            raise StarbucksError(f"{where}: id {i!r} is empty or contains whitespace; TREC run files cannot hold it")


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def _mismatch(meta: Mapping, other: Mapping, fields: Sequence[str]) -> str | None:
    """The first identity field on which two records disagree."""
    return next((f for f in fields if meta.get(f) != other.get(f)), None)


class EmbeddingStore:
    """One size's embedding directory: shards of passage vectors, query vectors, `meta.json`."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.dir)!r})"

    # ------------------------------------------------------------ meta

    @property
    def meta_path(self) -> Path:
        return self.dir / META_FILE

    def read_meta(self) -> dict | None:
        if not self.meta_path.is_file():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as err:
            raise StarbucksError(
                f"{self.meta_path} is not valid JSON ({err.msg}); delete {self.dir} and re-encode"
            ) from None

    def start(self, identity: Mapping, info: Mapping | None = None) -> dict:
        """Create `meta.json` with `identity` (checked) and `info` (recorded), or check an existing one."""
        record = {"format_version": STORE_VERSION, "dtype": DTYPE, "complete": False, **(info or {}), **identity}
        with writing(self.meta_path):
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-meta.", dir=self.dir)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(record, indent=2, sort_keys=True) + "\n")
                os.link(tmp, self.meta_path)  # create-if-absent, atomic: concurrent workers agree
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        meta = self.read_meta()
        for key, value in identity.items():
            if meta.get(key) != value:
                raise StarbucksError(
                    f"{self.dir} was encoded with {key} = {meta.get(key)!r}, now {value!r}; delete {self.dir} "
                    f"to re-encode, or point paths.embeddings elsewhere"
                )
        return meta

    def require_complete(self) -> dict:
        """The meta of a finished store, else one line saying what to run."""
        meta = self.read_meta()
        if meta is None:
            raise StarbucksError(f"no embeddings in {self.dir}; run `python -m encode` for this size first")
        if not meta.get("complete"):
            done = len(self.shard_indices())
            raise StarbucksError(
                f"embeddings in {self.dir} are incomplete ({done} shards written); re-run `python -m encode` "
                f"(every --shard slice) to finish them"
            )
        missing = [k for k in range(meta["shards"]) if not self.has_shard(k)]
        if missing:
            raise StarbucksError(f"{self.dir} lacks shard {missing[0]} of {meta['shards']}; re-run `python -m encode`")
        return meta

    @property
    def size(self) -> Size:
        meta = self.require_complete()
        return recorded_size(meta["size"], meta["layers"], meta["dim"])

    # ------------------------------------------------------------ passage shards

    def shard_path(self, k: int) -> Path:
        return self.dir / f"shard-{k:05d}.npy"

    def ids_path(self, k: int) -> Path:
        return self.dir / f"ids-{k:05d}.txt"

    def texts_path(self, k: int) -> Path:
        return self.dir / f"texts-{k:05d}.sha256"

    def has_shard(self, k: int) -> bool:
        return self.shard_path(k).is_file() and self.ids_path(k).is_file()

    def shard_problem(self, k: int, texts_digest: str, ids: Sequence[str] | None = None) -> str | None:
        """Why shard `k` must be encoded again (missing, damaged, of other passages when `ids` are given and
        differ, or made from other passage texts), or None."""
        if not self.has_shard(k):
            return "missing"
        stored = self.read_ids(k)
        if ids is not None and stored != list(ids):
            return "of other passages"
        try:
            rows = self.load_shard(k).shape[0]
        except StarbucksError:
            return "damaged"
        if rows != len(stored):
            return "damaged"
        saved = self.texts_path(k).read_text().strip() if self.texts_path(k).is_file() else None
        if saved != texts_digest:
            return "made from other passage texts" if saved else "made without a record of its texts"
        return None

    def shard_indices(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _SHARD.match(p.name)))

    def write_shard(self, k: int, ids: Sequence[str], vectors: np.ndarray, texts_digest: str | None = None) -> None:
        """Write shard `k` atomically (ids and the hash of its texts first; the `.npy` marks it complete)."""
        if len(ids) != len(vectors):
            raise ValueError(f"shard {k}: {len(ids)} ids but {len(vectors)} vectors")
        self.shard_path(k).unlink(missing_ok=True)  # a shard being replaced is incomplete until its .npy is back
        atomic_write_text(self.ids_path(k), "".join(i + "\n" for i in ids))
        if texts_digest is not None:
            atomic_write_text(self.texts_path(k), texts_digest + "\n")
        else:
            self.texts_path(k).unlink(missing_ok=True)  # a record of other texts must not outlive them
        _write_npy(self.shard_path(k), np.ascontiguousarray(vectors, dtype=DTYPE))

    def read_ids(self, k: int) -> list[str]:
        return _read_lines(self.ids_path(k))

    def load_shard(self, k: int) -> np.ndarray:
        """Shard `k`'s vectors, memory-mapped (float16, rows x dim); a damaged file is one line."""
        path = self.shard_path(k)
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            size = path.stat().st_size if path.is_file() else 0
            raise StarbucksError(
                f"embedding shard {path} is damaged ({size} bytes: {first_line(err)}); "
                f"re-run `python -m encode` with the same config: it re-encodes damaged shards"
            ) from None

    def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """`(shard, first_row, vectors)` for every shard of a finished store, in corpus order."""
        meta = self.require_complete()
        row = 0
        for k in range(meta["shards"]):
            vectors = self.load_shard(k)
            if vectors.ndim != 2 or vectors.shape[1] != meta["dim"]:
                raise StarbucksError(
                    f"{self.shard_path(k)} has shape {vectors.shape}, expected (rows, {meta['dim']}); re-encode"
                )
            yield k, row, vectors
            row += len(vectors)

    def ids(self) -> list[str]:
        """All passage ids in corpus order (row `i` of the concatenated shards is `ids()[i]`)."""
        meta = self.require_complete()
        out: list[str] = []
        for k in range(meta["shards"]):
            out.extend(self.read_ids(k))
        return out

    def finalize(self, count: int, ids_digest: str) -> dict | None:
        """Mark the store complete if all `ceil(count / shard_rows)` shards exist; None if some are missing.

        The ids files are re-hashed and must equal `ids_digest` (the corpus streamed by the caller),
        so shards left from another corpus are caught here.
        """
        meta = self.read_meta()
        shards = -(-count // meta["shard_rows"]) if count else 0
        if any(not self.has_shard(k) for k in range(shards)):
            return None
        hasher, texts = IdsHasher(), hashlib.sha256()
        for k in range(shards):
            ids = self.read_ids(k)
            rows = self.load_shard(k).shape[0]
            texts.update((self.texts_path(k).read_text() if self.texts_path(k).is_file() else "-\n").encode())
            expected = min(meta["shard_rows"], count - k * meta["shard_rows"])
            if len(ids) != rows or rows != expected:
                raise StarbucksError(
                    f"{self.shard_path(k)} has {rows} rows and {len(ids)} ids, expected {expected}; "
                    f"delete it and re-run `python -m encode`"
                )
            hasher.update(ids)
        if hasher.hexdigest() != ids_digest:
            raise StarbucksError(
                f"the shards in {self.dir} hold other passage ids than the corpus; it changed since they were "
                f"written: delete {self.dir} and re-encode"
            )
        meta.update(count=count, shards=shards, ids_sha256=ids_digest, texts_sha256=texts.hexdigest(), complete=True)
        atomic_write_json(self.meta_path, meta)
        return meta

    # ------------------------------------------------------------ queries

    def queries_path(self, split: str) -> Path:
        return self.dir / f"queries-{split}.npy"

    def write_queries(
        self, split: str, ids: Sequence[str], vectors: np.ndarray, identity: Mapping, info: Mapping | None = None
    ) -> None:
        """Query vectors of one split, with their ids and a meta file (written last)."""
        base = self.queries_path(split)
        atomic_write_text(base.with_suffix(".ids.txt"), "".join(i + "\n" for i in ids))
        _write_npy(base, np.ascontiguousarray(vectors, dtype=DTYPE))
        meta = {
            "format_version": STORE_VERSION,
            "dtype": DTYPE,
            "split": split,
            "count": len(ids),
            "ids_sha256": ids_sha256(ids),
            **(info or {}),
            **identity,
        }
        atomic_write_json(base.with_suffix(".json"), meta)

    def has_queries(self, split: str) -> bool:
        return self.queries_path(split).with_suffix(".json").is_file()

    def query_splits(self) -> list[str]:
        """The splits whose query embeddings are stored."""
        return sorted(p.name[len("queries-") : -len(".json")] for p in self.dir.glob("queries-*.json"))

    def queries_up_to_date(self, split: str, ids: Sequence[str], identity: Mapping) -> bool:
        """Whether the split's stored queries are these ids, encoded with this identity."""
        if not self.has_queries(split):
            return False
        meta = json.loads(self.queries_path(split).with_suffix(".json").read_text())
        return meta.get("ids_sha256") == ids_sha256(ids) and all(meta.get(k) == v for k, v in identity.items())

    def load_queries(self, split: str) -> tuple[list[str], np.ndarray, dict]:
        """`(ids, vectors, meta)` of a split's queries; refused if encoded by another model or size."""
        base = self.queries_path(split)
        if not self.has_queries(split):
            raise StarbucksError(f"no query embeddings for split {split!r} in {self.dir}; run `python -m encode` first")
        meta = json.loads(base.with_suffix(".json").read_text())
        field = _mismatch(self.require_complete(), meta, COMPATIBLE_FIELDS)
        if field:
            passages = self.require_complete()
            older_queries = base.with_suffix(".json").stat().st_mtime <= self.meta_path.stat().st_mtime
            fix = (
                "the queries are older: re-run `python -m encode` with the config that encoded the passages (it "
                "re-encodes stale queries)"
                if older_queries
                else f"the passages are older: delete {self.dir} and re-run `python -m encode` with the config that "
                f"encoded the queries"
            )
            raise StarbucksError(
                f"{base.name} does not match the passages in {self.dir}: {field} is {meta.get(field)!r} for the queries "
                f"but {passages.get(field)!r} for the passages; {fix}"
            )
        ids = _read_lines(base.with_suffix(".ids.txt"))
        vectors = np.load(base)
        if len(ids) != len(vectors) or ids_sha256(ids) != meta["ids_sha256"]:
            raise StarbucksError(
                f"{base} and its ids do not belong together; delete them and re-run `python -m encode`"
            )
        return ids, vectors, meta


def finished_stores(root: str | os.PathLike) -> list[EmbeddingStore]:
    """The complete stores under an embeddings directory, smallest size first."""
    found = []
    for meta_path in Path(root).glob(f"*/{META_FILE}"):
        meta = EmbeddingStore(meta_path.parent).read_meta()
        if meta and meta.get("complete"):
            found.append((meta["layers"], meta["dim"], meta["size"], EmbeddingStore(meta_path.parent)))
    return [store for *_, store in sorted(found, key=lambda t: t[:3])]


def select_stores(root: str | os.PathLike, spec: str | Sequence[str] | None) -> list[EmbeddingStore]:
    """Finished stores named by `spec` (size names, `LxD` or hybrid specs, comma list); `all`: every finished one."""
    done = finished_stores(root)
    names = {}
    for store in done:
        meta = store.read_meta()
        if "+" not in meta["size"]:  # a hybrid's layers and dim are not its name
            names[f"{meta['layers']}x{meta['dim']}"] = store
        names[meta["size"]] = store
    wanted = parse_names(spec)
    if wanted is not None:
        wanted = [hybrid_key(w) for w in wanted]
    if wanted is None:
        if not done:
            raise StarbucksError(f"no finished embeddings under {root}; run `python -m encode` first")
        return done
    for w in wanted:
        if w not in names:
            have = ", ".join(s.read_meta()["size"] for s in done) or "none"
            raise StarbucksError(
                f"no finished embeddings for size {w!r} under {root} (finished: {have}); "
                f"run `python -m encode encode.sizes={w}` first"
            )
    return list(dict.fromkeys(names[w] for w in wanted))
