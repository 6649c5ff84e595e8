"""FAISS indexes of the search stage: building one from an `index_factory` string, its search parameters,
its errors. The exact searches (flat FAISS, torch matmul + top-k) live in `retrieval.exact_search`."""

from __future__ import annotations

import faiss

from retrieval.errors import StarbucksError
from retrieval.settings import first_line

EXACT = "Flat"


def faiss_reason(err: Exception) -> str:
    """The useful part of a FAISS C++ error ("... failed: <reason>")."""
    line = first_line(err)
    for marker in ("failed: ", "Error: "):
        if marker in line:
            return line.split(marker, 1)[1]
    return line.rsplit(": ", 1)[-1]


def make_index(spec: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a FAISS `index_factory` string."""
    try:
        return faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise StarbucksError(
            f"search.index = {spec!r} is not a usable FAISS index_factory string for {dim}-dim vectors: "
            f"{faiss_reason(err)}"
        ) from None
