"""Request and response bodies of the HTTP API (they make up the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

USER_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
Timing = dict[str, float | int | str]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Request):
    user_id: str | None = Field(
        default=None,
        pattern=USER_ID,
        description="whose personal adapter to apply; default: the token's user",
    )
    prompt: str
    max_new_tokens: int = Field(default=32, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, description="sampling seed (reproducible outputs)")
    global_version: int | None = Field(default=None, ge=0, description="pin a retained global version")
    use_personal: bool = Field(default=True, description="false: base + global only")


class ScoreRequest(_Request):
    user_id: str | None = Field(default=None, pattern=USER_ID)
    texts: list[str] = Field(min_length=1)
    global_version: int | None = Field(default=None, ge=0)
    use_personal: bool = True


class ServedFields(BaseModel):
    federation: str
    user_id: str | None
    global_version: int | None
    personal_adapter_version: int | None
    timing: Timing


class GenerateResponse(ServedFields):
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


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 410, 413, 422, 503, 504)
}
