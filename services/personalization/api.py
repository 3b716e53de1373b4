"""Request and response bodies of the HTTP API (they make up the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

USER_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
Timing = dict[str, float | int | str]

# Hard bounds of every numeric and size field (schema level: 422 with the field named). The service's
# configured limits (ServeSettings: max_new_tokens, max_prompt_chars, max_score_texts) are checked on top.
SEED_MAX = 2**31 - 1
VERSION_MAX = 2**53 - 1  # versions are Redis integers; JSON numbers are exact up to 2**53
MAX_NEW_TOKENS = 4096
MAX_TEXT_CHARS = 1 << 20
MAX_TEXTS = 1024
MAX_QUERY_CHARS = 4096
MAX_CONTEXT_BYTES = 64 * 1024  # a device-side context (UTF-8)
RetrievalMode = Literal["hybrid", "dense", "lexical"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrievalParams(_Request):
    """Retrieve from the acting user's own documents and prepend the best chunks as context."""

    k: int = Field(default=4, ge=1, le=32, description="chunks to retrieve")
    mode: RetrievalMode = "hybrid"
    query: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_QUERY_CHARS,
        description="default: the text (score) or the prompt (generate)",
    )
    queries: list[Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TEXTS,
        description="one query per text (score; generate: one), e.g. the text before each; excludes query",
    )
    max_context_tokens: int = Field(
        default=512, ge=16, le=2048, description="model tokens of context, at most"
    )


class _Augmentable(_Request):
    retrieval: RetrievalParams | None = Field(
        default=None, description="retrieve context from the user's documents (off by default)"
    )
    context: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CONTEXT_BYTES,
        description="context retrieved on the device (the service stores nothing); excludes retrieval",
    )

    @model_validator(mode="after")
    def _one_source(self) -> _Augmentable:
        if self.retrieval is not None and self.retrieval.query is not None and self.retrieval.queries:
            raise ValueError("retrieval.query and retrieval.queries are mutually exclusive")
        if self.retrieval is not None and self.context is not None:
            raise ValueError("retrieval and context are mutually exclusive")
        if self.context is not None:
            try:
                size = len(self.context.encode("utf-8"))
            except UnicodeEncodeError:
                raise ValueError("context is not valid Unicode (lone surrogates)") from None
            if size > MAX_CONTEXT_BYTES:
                raise ValueError(f"context has {size} UTF-8 bytes; at most {MAX_CONTEXT_BYTES}")
        return self


class GenerateRequest(_Augmentable):
    user_id: str | None = Field(
        default=None,
        pattern=USER_ID,
        description="whose personal adapter to apply; default: the token's user",
    )
    prompt: str = Field(max_length=MAX_TEXT_CHARS)
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="sampling seed (reproducible outputs), 0..2**31-1"
    )
    global_version: int | None = Field(
        default=None, ge=0, le=VERSION_MAX, description="pin a retained global version"
    )
    use_personal: bool = Field(default=True, description="false: base + global only")


class ScoreRequest(_Augmentable):
    user_id: str | None = Field(default=None, pattern=USER_ID)
    texts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(min_length=1, max_length=MAX_TEXTS)
    global_version: int | None = Field(default=None, ge=0, le=VERSION_MAX)
    use_personal: bool = True


class ServedFields(BaseModel):
    federation: str
    user_id: str | None
    global_version: int | None
    personal_adapter_version: int | None
    timing: Timing


class RetrievedChunk(BaseModel):
    doc_id: str
    chunk_id: int
    score: float


class RetrievalInfo(BaseModel):
    """What was prepended: chunks retrieved by the service, or a context sent by the device."""

    source: Literal["service", "device"]
    k: int | None = None
    mode: str | None = None
    hits: list[RetrievedChunk] = Field(default_factory=list)
    generation: int | None = Field(default=None, description="the user's document store generation searched")
    context_tokens: int = Field(description="model tokens of context prepended (after truncation)")


class GenerateResponse(ServedFields):
    retrieval: RetrievalInfo | None = None
    text: str
    tokens: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str


class TextScore(BaseModel):
    mean_nll: float = Field(description="mean next-token negative log-likelihood (nats)")
    perplexity: float
    token_accuracy: float = Field(description="fraction of positions where the argmax is the next token")
    tokens: int = Field(description="predicted positions")
    retrieval: RetrievalInfo | None = None


class ScoreResponse(ServedFields):
    results: list[TextScore]


class AdapterInfo(BaseModel):
    federation: str
    user_id: str
    version: int
    trained_against: int
    created_at: str
    digest: str
    size_bytes: int
    num_tensors: int
    num_parameters: int
    upload_encoding: dict[str, Any]
    gate: float = 1.0


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 410, 413, 422, 429, 503, 504)
}
