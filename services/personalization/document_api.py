"""Request and response bodies of the document routes (a user's private retrieval store)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.personalization.api import MAX_QUERY_CHARS, RetrievalMode
from services.personalization.documents import DOC_ID

MAX_DOCUMENT_CHARS = 1 << 20  # schema bound; the service's doc_max_chars (default 256 KiB) is checked on top
MAX_DOCUMENTS = 1024
MAX_METADATA_ITEMS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SEARCH_K = 32
MAX_LIST_LIMIT = 1000


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DocumentIn(_Request):
    id: str | None = Field(
        default=None, pattern=DOC_ID, description="letters, digits, ._- (at most 128); default: generated"
    )
    text: str = Field(min_length=1, max_length=MAX_DOCUMENT_CHARS)
    metadata: dict[str, str] = Field(
        default_factory=dict, description=f"at most {MAX_METADATA_ITEMS} short string pairs"
    )

    @field_validator("metadata")
    @classmethod
    def _bounded(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_METADATA_ITEMS:
            raise ValueError(f"at most {MAX_METADATA_ITEMS} metadata items")
        for key, item in value.items():
            if not 1 <= len(key) <= MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
                raise ValueError(
                    f"metadata keys have 1..{MAX_METADATA_KEY} characters, "
                    f"values at most {MAX_METADATA_VALUE}"
                )
        return value


class AddDocumentsRequest(_Request):
    documents: list[DocumentIn] = Field(min_length=1, max_length=MAX_DOCUMENTS)


class DocumentInfo(BaseModel):
    id: str
    chunks: int
    chars: int
    created_at: datetime
    metadata: dict[str, str]


class DocumentsAdded(BaseModel):
    documents: list[DocumentInfo]
    generation: int = Field(description="the user's store generation after the change")


class DocumentList(BaseModel):
    documents: list[DocumentInfo]
    total: int
    offset: int
    limit: int


class SearchRequest(_Request):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(default=4, ge=1, le=MAX_SEARCH_K)
    mode: RetrievalMode = "hybrid"


class SearchHit(BaseModel):
    doc_id: str
    chunk_id: int = Field(description="the chunk's index within its document")
    score: float = Field(description="the ranking score (hybrid: reciprocal rank fusion)")
    dense: float | None = Field(description="cosine similarity to the query (dense and hybrid)")
    lexical: float | None = Field(description="BM25 score (lexical and hybrid)")
    text: str


class SearchResponse(BaseModel):
    hits: list[SearchHit]
    generation: int
