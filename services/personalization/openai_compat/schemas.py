"""Request bodies of the OpenAI-compatible routes, their bounds, and the ``model`` names.

Bodies are parsed by hand (:func:`parse_body`) so that every refusal is a 400 in OpenAI's shape naming
the parameter. Parameters a PFI model cannot honour are refused unless they carry their neutral value
(clients such as LangChain send ``frequency_penalty: 0``, ``logprobs: null``...): ``n`` must be 1.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.personalization.api import MAX_NEW_TOKENS, MAX_TEXT_CHARS, SEED_MAX, USER_ID
from services.personalization.openai_compat.errors import InvalidParam
from services.settings import ServeSettings

COMPLETIONS_ROUTE = ("POST", "/v1/completions")
CHAT_ROUTE = ("POST", "/v1/chat/completions")
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MODEL = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62})(?:@(0|[1-9][0-9]{0,15}))?$")
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False),
    "response_format": (None, {"type": "text"}),
}

B = TypeVar("B", bound=BaseModel)


def body_cap(serve: ServeSettings) -> int:
    """Bytes a completion body may have: the prompt (or all messages) at ``max_prompt_chars``
    characters of UTF-8 (at most 4 bytes each, 6 when JSON-escaped) plus 64 KiB for the rest."""
    return 6 * serve.max_prompt_chars + 64 * 1024


def parse_model(model: str) -> tuple[str, int | None]:
    """``fed`` or ``fed@version`` -> (federation, pinned version or None); :class:`ValueError` else."""
    match = MODEL.match(model)
    if match is None:
        raise ValueError(model)
    version = match.group(2)
    return match.group(1), None if version is None else int(version)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # extras are checked by _neutral_extras (named 400s)

    model: str = Field(min_length=1, max_length=96)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, pattern=USER_ID)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        """``"temperature": null`` and the like mean "the default" for OpenAI clients."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @model_validator(mode="after")
    def _neutral_extras(self) -> _Body:
        for name, value in (self.model_extra or {}).items():
            if name not in _NEUTRAL:
                raise ValueError(f"unsupported parameter {name!r}")
            if value not in _NEUTRAL[name]:
                raise ValueError(f"{name}={value!r} is not supported (only {_NEUTRAL[name][1:]!r})")
        return self

    @field_validator("n")
    @classmethod
    def _one(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence has 1 to {MAX_STOP_CHARS} characters")
        return stop

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Body):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] = Field(default="")

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, prompt: str | list[str]) -> str | list[str]:
        if any(len(p) > MAX_TEXT_CHARS for p in ([prompt] if isinstance(prompt, str) else prompt)):
            raise ValueError(f"the prompt has more than {MAX_TEXT_CHARS} characters")
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(max_length=MAX_TEXT_CHARS)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)

    @property
    def budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_body(model: type[B], raw: bytes) -> B:
    """``raw`` JSON as ``model``; the first problem is an :class:`InvalidParam` naming its field."""
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = ".".join(loc) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        raise InvalidParam(f"{param}: {message}" if param else message, param=param) from None
