"""The retrieval core's one error type: a bad input to chunking, embedding or search."""

from __future__ import annotations

from schemas.errors import PFIError


class RetrievalError(PFIError):
    """An input the retrieval core refuses (bad ``k``, mode, shape or parameter); callers map it to a 4xx."""
