"""Kafka cluster ids the storage tool can take as an argument."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from services.stack.broker_config import new_cluster_id, usable_cluster_id


def test_an_id_starting_with_a_dash_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0xF8 encodes to "-" as the first URL-safe base64 character: "kafka-storage format -t -…" fails on it.
    draws: Iterator[uuid.UUID] = iter(
        [uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" + bytes(15))]
    )
    monkeypatch.setattr(uuid, "uuid4", lambda: next(draws))
    cluster_id = new_cluster_id()
    assert cluster_id.startswith("A")
    assert len(cluster_id) == 22


def test_ids_are_22_url_safe_characters_never_led_by_a_dash() -> None:
    ids = {new_cluster_id() for _ in range(2000)}  # ~31 of 2000 plain draws would start with "-"
    assert len(ids) == 2000
    assert all(len(i) == 22 and usable_cluster_id(i) for i in ids)


@pytest.mark.parametrize("stored", ["", "-x8hRk0cQe2m4oXn1b3vLw"])
def test_stored_ids_the_tool_cannot_take_are_not_usable(stored: str) -> None:
    assert not usable_cluster_id(stored)
