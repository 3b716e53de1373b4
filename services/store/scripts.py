"""The Lua scripts of the Redis layout: every script PFI runs in Redis is a file of services/store/lua/
(the keys they touch are named in :mod:`services.store.keys`)."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def lua(name: str) -> str:
    """The source of ``services/store/lua/<name>``."""
    return resources.files("services.store").joinpath("lua", name).read_text()
