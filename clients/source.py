"""Where an edge agent gets its federation's spec and the latest global adapter.

``GlobalSource`` is the small interface; :class:`clients.http_source.HttpGlobalSource` implements it over
the personalization service's API (what a device uses). Harnesses may bring their own (the fleet
simulator reads the version store). Sources cache the decoded adapter per version, so a fleet of
virtual agents in one process decodes each version once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from modeling.lora import StateDict
from schemas.errors import PFIError
from schemas.events import FederationSpec


class SourceError(PFIError):
    """The federation or its global adapter could not be fetched."""


@dataclass(frozen=True)
class GlobalAdapter:
    federation: str
    version: int
    state: StateDict  # shared read-only: copy before modifying


class GlobalSource(Protocol):
    async def spec(self, federation: str) -> FederationSpec: ...

    async def latest(self, federation: str) -> GlobalAdapter: ...
