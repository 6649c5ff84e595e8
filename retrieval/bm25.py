"""BM25 ranking of a corpus held in memory (`bm25s`), with deterministic top-k.

Used by hard-negative mining (`train.mine --retriever bm25`) and by the collection builders.
"""

from __future__ import annotations

from typing import Collection, Sequence

import numpy as np

from retrieval.errors import StarbucksError


def make_stemmer(name: str | None):
    """Return a PyStemmer stemmer for `name` ('english'), or None for no stemming."""
    if not name or name == "none":
        return None
    try:
        import Stemmer
    except ImportError:
        raise StarbucksError(f"the {name} stemmer needs PyStemmer: pip install PyStemmer") from None
    return Stemmer.Stemmer(name)


class BM25:
    """A bm25s index over `texts` with deterministic top-k (ties broken by corpus position).

    Tokenisation: `bm25s.tokenize` with English stopwords and an optional PyStemmer stemmer.
    The vocabulary is sorted so scores never depend on hash seeds.
    """

    def __init__(self, ids: Sequence[str], texts: Sequence[str], stemmer: str | None = None, progress: bool = True):
        import bm25s

        self.ids = list(ids)
        self.stemmer_name = stemmer or "none"
        self._stemmer = make_stemmer(stemmer)
        tokens = self.tokenize(texts)
        self.vocab = {tok: i for i, tok in enumerate(sorted({t for doc in tokens for t in doc}))}
        token_ids = [[self.vocab[t] for t in doc] for doc in tokens]
        self.retriever = bm25s.BM25()
        self.retriever.index((token_ids, self.vocab), create_empty_token=False, show_progress=progress)

    def tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        """Tokenise texts the way the index was built."""
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", stemmer=self._stemmer, return_ids=False, show_progress=False)

    def search(self, text: str, k: int, exclude: str | Collection[str] | None = None) -> list[tuple[str, float]]:
        """Top-`k` (doc id, score) with score > 0, best first; the id(s) in `exclude` are left out."""
        excluded = {exclude} if isinstance(exclude, str) else set(exclude or ())
        qids = [self.vocab[t] for t in self.tokenize([text])[0] if t in self.vocab]
        if not qids or k <= 0:
            return []
        scores = self.retriever.get_scores_from_ids(qids)
        positive = int(np.count_nonzero(scores > 0))
        want = min(k + len(excluded), positive)
        if want == 0:
            return []
        top = np.argpartition(-scores, want - 1)[:want]
        cand = np.flatnonzero(scores >= scores[top].min())
        cand = cand[np.lexsort((cand, -scores[cand]))]
        hits = [(self.ids[i], float(scores[i])) for i in cand if self.ids[i] not in excluded]
        return hits[:k]
