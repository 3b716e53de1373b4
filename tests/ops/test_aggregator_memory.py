"""The aggregator's memory limit in every overlay leaves room for what its settings let it hold.

The reassembly bound (``PFI_MAX_INFLIGHT_CHUNK_BYTES``) is one for the whole process, so the arithmetic
does not depend on how many federations a pod owns: the bound, plus a few decoded updates (validated
ahead of their turn, buffered, folded: ``MEMORY_DECODED_UPDATES`` times ``PFI_MAX_DECODED_BYTES``), plus
a baseline for the interpreter, torch and the Kafka fetch buffers.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.settings import PFISettings
from tests.ops.promql import OVERLAYS
from tests.ops.test_manifests import env_of, named

MEMORY_DECODED_UPDATES = 4
BASELINE_BYTES = 512 << 20
UNITS = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}


def quantity(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]i?)?", str(text))
    assert match, f"unsupported quantity {text!r}"
    return int(match.group(1)) * UNITS[match.group(2) or ""]


@pytest.mark.parametrize("name", OVERLAYS)
def test_aggregator_memory_limit_fits_the_reassembly_bound(
    name: str, overlays: dict[str, list[dict[str, Any]]]
) -> None:
    docs = overlays[name]
    container = named(docs, "Deployment", "pfi-aggregator")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container, docs)
    defaults = PFISettings()
    bound = int(env.get("PFI_MAX_INFLIGHT_CHUNK_BYTES", defaults.max_inflight_chunk_bytes))
    decoded = int(env.get("PFI_MAX_DECODED_BYTES", defaults.max_decoded_bytes))
    update = int(env.get("PFI_MAX_UPDATE_BYTES", defaults.max_update_bytes))
    assert bound >= update, f"{name}: a single upload of PFI_MAX_UPDATE_BYTES could never be reassembled"
    need = bound + MEMORY_DECODED_UPDATES * decoded + BASELINE_BYTES
    limit = quantity(container["resources"]["limits"]["memory"])
    assert limit >= need, f"{name}: aggregator memory limit {limit} < {need} (reassembly bound {bound})"
