"""Retrieval over a user's own text: chunking, MiniLM embeddings, BM25 and their fusion (pure compute).

Imported by the edge SDK (on-device retrieval) and by the services (per-user document store); it reads
nothing but the embedding model's files.
"""

from modeling.retrieval.chunking import (
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_WORDS,
    DEFAULT_OVERLAP_WORDS,
    TextChunk,
    chunk_text,
)
from modeling.retrieval.embedder import MINILM_NAME, Embedder, TransformerEmbedder, load_embedder
from modeling.retrieval.errors import RetrievalError
from modeling.retrieval.fusion import DEFAULT_RRF_K, reciprocal_rank_fusion
from modeling.retrieval.index import SEARCH_MODES, Hit, HybridIndex, SearchMode, build_context
from modeling.retrieval.lexical import LexicalIndex, tokenize

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_MAX_WORDS",
    "DEFAULT_OVERLAP_WORDS",
    "DEFAULT_RRF_K",
    "MINILM_NAME",
    "SEARCH_MODES",
    "Embedder",
    "Hit",
    "HybridIndex",
    "LexicalIndex",
    "RetrievalError",
    "SearchMode",
    "TextChunk",
    "TransformerEmbedder",
    "build_context",
    "chunk_text",
    "load_embedder",
    "reciprocal_rank_fusion",
    "tokenize",
]
