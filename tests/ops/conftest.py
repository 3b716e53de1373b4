"""Fixtures of the ops tests.

* ``tools`` (session): paths of kustomize, promtool, prometheus, ... from scripts/ops/install.sh
  (idempotent; everything cached outside the checkout, see the script).
* ``overlays`` (session): the rendered ``dev`` and ``prod`` overlays as lists of resources.
* ``live`` (package): an aggregator and, when importable, the personalization service running on the
  local stack with traffic, serving ``/metrics`` on loopback (tests/ops/live.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.ops.live import Endpoints, LiveServices, live_settings
from tests.ops.promql import OVERLAYS, build_overlay, ops_tools


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    return ops_tools()


@pytest.fixture(scope="session")
def overlays(tools: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    return {name: build_overlay(tools["KUSTOMIZE"], name) for name in OVERLAYS}


@pytest.fixture(scope="package")
def live(stack: Any, redis_url: str) -> Iterator[Endpoints]:
    services = LiveServices(live_settings(redis_url))
    try:
        yield services.start()
    finally:
        services.stop()
