"""`python -m encode`: corpus and eval queries -> per-size float16 embedding shards."""

from encode.pipeline import (
    EncodeSummary,
    Slice,
    encode_collection,
    encode_texts,
    load_model,
    loader_workers,
    worker_slice,
)

__all__ = [
    "EncodeSummary",
    "Slice",
    "encode_collection",
    "encode_texts",
    "load_model",
    "loader_workers",
    "worker_slice",
]
