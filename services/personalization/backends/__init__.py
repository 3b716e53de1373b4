"""Serving backends, one per module or package behind :mod:`.base`'s interface, chosen by name
(``PFI_SERVE_BACKEND``, default :data:`DEFAULT_BACKEND`).

The registry maps a name to a factory that imports its backend only when chosen, so a backend's
dependencies cost nothing to the services that do not use it. Adding one is a new module and one line
in :data:`BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable

from schemas.errors import ConfigError
from services.personalization.backends.base import ServingBackend


def _torch_slots() -> ServingBackend:
    from services.personalization.backends.torch_slots import TorchSlotsBackend

    return TorchSlotsBackend()


BACKENDS: dict[str, Callable[[], ServingBackend]] = {
    "torch-slots": _torch_slots,  # PyTorch, merged global + batched personal LoRA slots
}
DEFAULT_BACKEND = "torch-slots"


def backend_for(name: str) -> ServingBackend:
    """The backend registered as ``name``."""
    factory = BACKENDS.get(name)
    if factory is None:
        raise ConfigError(f"unknown serving backend {name!r}; one of {', '.join(sorted(BACKENDS))}")
    return factory()


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "ServingBackend", "backend_for"]
