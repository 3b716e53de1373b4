"""Splitting a document into overlapping word windows with character offsets into the original text.

A word is a run of non-space characters. Each chunk holds at most ``max_words`` words and, so that one
enormous "word" (a base64 blob, a URL) cannot make a huge chunk, at most ``max_chars`` characters:
longer words are cut into ``max_chars`` pieces. Consecutive chunks share ``overlap_words`` words (fewer
when the character bound ends a chunk early), and every word is in at least one chunk. ``text`` of a
chunk is the exact slice ``document[start:end]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modeling.retrieval.errors import RetrievalError

DEFAULT_MAX_WORDS = 64
DEFAULT_OVERLAP_WORDS = 16
DEFAULT_MAX_CHARS = 1024


@dataclass(frozen=True)
class TextChunk:
    index: int
    start: int  # character offsets into the document: text == document[start:end]
    end: int
    text: str


def _words(text: str, max_chars: int) -> list[tuple[int, int]]:
    pattern = re.compile(rf"\S{{1,{max_chars}}}")
    return [match.span() for match in pattern.finditer(text)]


def chunk_text(
    text: str,
    *,
    max_words: int = DEFAULT_MAX_WORDS,
    overlap_words: int = DEFAULT_OVERLAP_WORDS,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[TextChunk]:
    """The chunks of ``text`` in order (empty list for a text with no words)."""
    if max_words < 1:
        raise RetrievalError(f"max_words must be >= 1, got {max_words}")
    if not 0 <= overlap_words < max_words:
        raise RetrievalError(f"overlap_words must be in [0, max_words), got {overlap_words}")
    if max_chars < 1:
        raise RetrievalError(f"max_chars must be >= 1, got {max_chars}")
    words = _words(text, max_chars)
    chunks: list[TextChunk] = []
    first = 0
    while first < len(words):
        start = words[first][0]
        last = first  # the chunk is words[first:last + 1]; one word always fits (<= max_chars)
        limit = min(len(words), first + max_words)
        while last + 1 < limit and words[last + 1][1] - start <= max_chars:
            last += 1
        end = words[last][1]
        chunks.append(TextChunk(index=len(chunks), start=start, end=end, text=text[start:end]))
        if last + 1 >= len(words):
            break
        first = max(first + 1, last + 1 - overlap_words)
    return chunks
