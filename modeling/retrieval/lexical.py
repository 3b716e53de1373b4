"""BM25 over chunk texts (the ``bm25s`` library, Lucene variant).

Tokens are lower-cased runs of Unicode word characters with English stop words (NLTK's list)
removed; no stemmer. A query is scored against every chunk at once from bm25s's precomputed sparse
score matrix; terms the corpus never saw are ignored, and a query with no known term matches nothing
(an empty result).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN_PLUS

from modeling.retrieval.ranking import top_k

_TOKEN = re.compile(r"\w+")
_STOPWORDS = frozenset(STOPWORDS_EN_PLUS)  # the NLTK English list (179 words)
MAX_QUERY_TERMS = 256  # distinct terms of one query that are scored (bounds the work of a huge query)


def tokenize(text: str) -> list[str]:
    """The terms of ``text``: lower-cased word-character runs minus English stop words."""
    return [word for word in _TOKEN.findall(text.lower()) if word not in _STOPWORDS]


class LexicalIndex:
    """A BM25 index over a fixed list of texts; positions in results are indices into that list."""

    def __init__(self, model: bm25s.BM25 | None, size: int) -> None:
        self._model = model  # None: no text had a term
        self.size = size

    @classmethod
    def build(cls, texts: Sequence[str]) -> LexicalIndex:
        corpus = [tokenize(text) for text in texts]
        if not any(corpus):
            return cls(None, len(texts))
        model = bm25s.BM25(method="lucene")
        model.index(corpus, show_progress=False)
        return cls(model, len(texts))

    def scores(self, query: str) -> np.ndarray:
        """The BM25 score of every text for ``query`` (``(size,)`` float32; 0 where no term matches)."""
        if self._model is None:
            return np.zeros(self.size, dtype=np.float32)
        vocab = self._model.vocab_dict
        ids = sorted({vocab[term] for term in tokenize(query) if term in vocab and term})
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        result: np.ndarray = self._model.get_scores_from_ids(ids[:MAX_QUERY_TERMS])
        return result.astype(np.float32, copy=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Up to ``k`` ``(position, score)`` pairs scoring above 0, best first (ties: lower position)."""
        return top_k(self.scores(query), k, min_score=0.0)
