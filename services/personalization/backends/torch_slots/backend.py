"""The PyTorch backend ("torch-slots"): one merged copy of the base per global version, whose LoRA
target layers hold a fixed pool of personal adapter slots bound per batch (:mod:`.stacks`,
:mod:`.lora_slots`), scored and generated with Hugging Face models (:mod:`.inference`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from modeling.base import BaseModel
from schemas.events import FederationSpec
from schemas.records import VersionMeta
from services.personalization.backends.base import ServingBackend
from services.personalization.backends.torch_slots.stacks import SlotStack, base_stack, build_merged_stack


class TorchSlotsBackend(ServingBackend):
    name: ClassVar[str] = "torch-slots"

    def build_merged(
        self,
        base: BaseModel,
        spec: FederationSpec,
        version: int,
        global_state: Mapping[str, torch.Tensor],
        *,
        slots: int,
        meta: VersionMeta | None = None,
    ) -> SlotStack:
        return build_merged_stack(base, spec, version, global_state, slots=slots, meta=meta)

    def base_only(self, base: BaseModel, federation: str) -> SlotStack:
        return base_stack(base, federation)
