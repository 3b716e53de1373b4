"""Adapters out of and into a federation: ``pfi federation export`` and ``pfi federation create
--init-adapter`` over the Redis layout, and :func:`export_files`, the format switch the personal-adapter
export route shares with the CLI.

Formats: ``peft`` (a PEFT adapter directory, :mod:`.adapter_export`) and ``gguf`` (a llama.cpp LoRA
adapter, :mod:`.llamacpp_export`, for LLaMA-family bases), each with ``pfi_export.json`` (provenance:
federation, version, digest, spec fingerprint, base model).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from modeling.base import load_base_model
from modeling.blobs import BLOB_ENCODING
from modeling.lora import StateDict, adapter_shapes, init_adapter
from schemas.codec import decode_tensors
from schemas.errors import CodecError, ConfigError
from schemas.events import FederationSpec, LoraSpec, utcnow
from schemas.records import VersionMeta
from services.federation.adapter_export import (
    GGUF_FILE,
    PROVENANCE_FILE,
    base_model_name,
    peft_files,
    write_dir,
)
from services.federation.adapter_import import load_peft_dir, read_peft_dir, reconcile
from services.federation.llamacpp_export import base_arch, gguf_lora_bytes
from services.store.versions import StoreError, VersionStore

Format = Literal["peft", "gguf"]
FORMATS: tuple[Format, ...] = ("peft", "gguf")
MAX_DECODED_BYTES = 1 << 30


def export_files(
    state: Mapping[str, torch.Tensor],
    lora: LoraSpec,
    base_model: str,
    fmt: str,
    *,
    provenance: Mapping[str, Any],
    base_name: str | None = None,
) -> dict[str, bytes]:
    """The files of an export (name -> bytes). CPU work: call it off the event loop."""
    name = base_model_name(base_model, base_name)
    meta = {**provenance, "base_model": base_model}
    if fmt == "peft":
        return peft_files(state, lora, base_name=name, provenance=meta)
    if fmt == "gguf":
        arch = base_arch(base_model)
        title = f"{provenance.get('federation', 'pfi')} v{provenance.get('version', '?')} LoRA"
        info = {**meta, "format": "gguf", "lora": lora.model_dump(mode="json"), "architecture": arch.arch}
        return {
            GGUF_FILE: gguf_lora_bytes(state, lora, arch, name=title),
            PROVENANCE_FILE: (json.dumps(info, indent=2, sort_keys=True) + "\n").encode(),
        }
    raise ConfigError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")


@dataclass(frozen=True)
class Exported:
    federation: str
    version: int
    digest: str
    out: Path
    files: tuple[str, ...]


async def load_global(
    store: VersionStore, fed: str, version: int | None
) -> tuple[FederationSpec, int, VersionMeta, StateDict]:
    """Spec, version number, metadata and decoded tensors of ``fed``'s version (default: latest)."""
    spec = await store.require_spec(fed)
    number = await store.latest(fed) if version is None else version
    if number is None:
        raise StoreError(f"federation {fed!r} has no global version yet")
    meta = await store.get_meta(fed, number)
    blob = await store.get_blob(fed, number)
    if meta is None or blob is None:
        raise StoreError(f"federation {fed!r} has no retained version {number} (see `pfi federation status`)")
    try:
        state = await asyncio.to_thread(
            decode_tensors, blob, BLOB_ENCODING, max_decoded_bytes=MAX_DECODED_BYTES
        )
    except CodecError as err:
        raise StoreError(f"{fed} v{number} does not decode: {err}") from None
    return spec, number, meta, state


def provenance(spec: FederationSpec, version: int, digest: str, kind: str) -> dict[str, Any]:
    return {
        "federation": spec.name,
        "version": version,
        "digest": digest,
        "spec_fingerprint": spec.fingerprint(),
        "adapter": kind,
        "exported_at": utcnow().isoformat(),
    }


async def export_global(
    store: VersionStore,
    fed: str,
    out: Path,
    *,
    version: int | None = None,
    fmt: str = "peft",
    force: bool = False,
    base_name: str | None = None,
) -> Exported:
    """Write ``fed``'s global adapter (``version``, default latest) to the directory ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    spec, number, meta, state = await load_global(store, fed, version)
    files = await asyncio.to_thread(
        export_files,
        state,
        spec.lora,
        spec.base_model,
        fmt,
        provenance=provenance(spec, number, meta.digest, "global"),
        base_name=base_name,
    )
    await asyncio.to_thread(write_dir, files, out, force=force)
    return Exported(federation=fed, version=number, digest=meta.digest, out=out, files=tuple(sorted(files)))


def _build_template(spec: FederationSpec) -> dict[str, tuple[int, ...]]:
    base = load_base_model(spec.base_model)
    return adapter_shapes(init_adapter(spec, base.model))


async def create_from_peft(
    store: VersionStore,
    spec: FederationSpec,
    directory: Path,
    *,
    given: Mapping[str, Any] | None = None,
) -> tuple[FederationSpec, VersionMeta]:
    """Create ``spec``'s federation with the PEFT adapter in ``directory`` as v0. The spec's LoRA config
    becomes the adapter's; ``given`` (``rank``/``alpha``/``target_modules`` the operator named) must
    agree with it. The adapter's names and shapes are checked against the federation's own v0 on the
    base model before anything is written."""
    from services.federation.admin import (
        create_with_state,
    )  # not at import: the serving route needs none of it

    imported_lora, _ = read_peft_dir(directory)  # fail fast on the config, before loading the base
    if given:
        reconcile(spec.lora.model_copy(update=dict(given)), imported_lora)
    spec = spec.model_copy(update={"lora": imported_lora})
    spec = FederationSpec.model_validate(spec.model_dump())  # re-validate the derived spec
    if await store.get_spec(spec.name) is not None:
        raise ConfigError(f"federation {spec.name!r} already exists")
    template = await asyncio.to_thread(_build_template, spec)
    imported = await asyncio.to_thread(load_peft_dir, directory, template)
    meta = await create_with_state(store, spec, imported.state, source="pfi://admin/import")
    return spec, meta
