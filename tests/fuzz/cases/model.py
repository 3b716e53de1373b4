"""What a fuzz case is (:class:`Case`, :class:`RefusedCase`) and what it is built for (:class:`Limits`,
:class:`Party`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from schemas.errors import RejectReason
from schemas.events import Envelope
from services.settings import PFISettings

RAW = "raw"
SDK = "sdk"


@dataclasses.dataclass
class Case:
    """One input and what the aggregator must do with it.

    ``expect``: for ``raw`` cases ``(message index, reason)`` pairs (one dead letter each, at that
    message's offset); for ``sdk`` cases ``(-1, reason)`` pairs matched by ``update_id``. Empty for a
    valid update, which must be aggregated exactly once instead."""

    category: str
    variant: str
    path: str
    key: bytes | None = None
    messages: list[bytes | None] = dataclasses.field(default_factory=list)
    envelope: Envelope[Any] | None = None
    expect: list[tuple[int, RejectReason]] = dataclasses.field(default_factory=list)
    update_id: str | None = None

    @property
    def valid(self) -> bool:
        return self.category == "valid"

    @property
    def label(self) -> str:
        return f"{self.category}/{self.variant}[{self.path}]"


@dataclasses.dataclass
class RefusedCase:
    """Bad input the SDK refuses before sending: ``call()`` must raise ``error``."""

    variant: str
    call: Callable[[], object]
    error: type[BaseException] | tuple[type[BaseException], ...]


@dataclasses.dataclass(frozen=True)
class Limits:
    """The aggregator settings the cases are built against."""

    max_update_bytes: int
    max_decoded_bytes: int
    sdk_chunk_bytes: int

    @classmethod
    def of(cls, settings: PFISettings, sdk_chunk_bytes: int) -> Limits:
        return cls(settings.max_update_bytes, settings.max_decoded_bytes, sdk_chunk_bytes)


@dataclasses.dataclass(frozen=True)
class Party:
    """A registered (or deliberately unregistered) client."""

    client_id: str
    key: bytes
