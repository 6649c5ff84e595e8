"""Starbucks 2D Matryoshka dense retrieval: the library every stage imports."""

from retrieval.errors import StarbucksError
from retrieval.sizes import Size, SizeList

__all__ = ["Size", "SizeList", "StarbucksError", "StarbucksModel"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "StarbucksModel":  # imported on first use: it brings torch and transformers
        from retrieval.model import StarbucksModel

        return StarbucksModel
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
