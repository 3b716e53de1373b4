"""The PyTorch serving backend: merged global copies with batched personal LoRA slots."""

from services.personalization.backends.torch_slots.backend import TorchSlotsBackend

__all__ = ["TorchSlotsBackend"]
