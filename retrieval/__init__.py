"""Starbucks 2D Matryoshka dense retrieval: the library every stage imports."""

from retrieval.errors import StarbucksError
from retrieval.sizes import Size, SizeList

__all__ = ["Size", "SizeList", "StarbucksError"]
__version__ = "0.1.0"
