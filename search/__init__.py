"""`python -m search`: one FAISS (or exact torch) search per size -> TREC run files."""

from retrieval.exact_search import TopK
from search.pipeline import SearchSettings, load_or_build_index, search_collection, search_store

__all__ = ["SearchSettings", "TopK", "load_or_build_index", "search_collection", "search_store"]
