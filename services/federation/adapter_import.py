"""Reading an existing PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
as a federation's v0: ``pfi federation create NAME --base-model B --init-adapter DIR``.

Everything in the directory is untrusted input: the config is bounded (size, fields PFI can honour),
the weights file is bounded by what the spec's adapter can need, its header is read before any tensor,
names and shapes must equal exactly those of the federation's own v0 on its base model (so an adapter
for another base or another config is refused with the names that differ), values must be finite and of
sane magnitude. PEFT features that change the arithmetic are refused (DoRA, per-module rank/alpha
patterns, ``modules_to_save``, biases, ``fan_in_fan_out``, layer subsets); rsLoRA is folded into
``alpha`` (``alpha / sqrt(r)`` scaling is ``alpha' / r`` with ``alpha' = alpha sqrt(r)``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modeling.lora import StateDict
from schemas.errors import ConfigError
from schemas.events import LoraSpec
from services.federation.adapter_export import CONFIG_FILE, WEIGHTS_FILE, check_state

MAX_CONFIG_BYTES = 256 * 1024
MAX_ABS_VALUE = 1e4  # as for personal adapter uploads: larger is not a trained LoRA weight
BYTES_PER_PARAM = 8  # a float64 file is the largest a PEFT adapter's weights can honestly be
HEADER_SLACK = 16 << 20
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_EMPTY: tuple[object, ...] = (None, False, [], {}, "", "none")
#: PEFT config fields whose non-default value PFI cannot reproduce (field -> why).
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "layers_to_transform": "a subset of layers",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA biases",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters",
    "exclude_modules": "exclude_modules",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


@dataclass(frozen=True)
class ImportedAdapter:
    lora: LoraSpec  # what the directory's tensors and config mean in PFI's terms
    state: StateDict  # float32, PEFT names
    base_model_name: str | None


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes, more than {MAX_CONFIG_BYTES} (not a PEFT config)")
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def lora_from_config(raw: Mapping[str, Any], source: str = CONFIG_FILE) -> LoraSpec:
    """The :class:`LoraSpec` a PEFT ``adapter_config.json`` describes (:class:`ConfigError` if PFI
    cannot serve it exactly)."""
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ConfigError(f"{source}: peft_type {peft_type!r}; only LORA adapters can be imported")
    task = raw.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{source}: task_type {task!r}; PFI federations are CAUSAL_LM")
    for field, what in _UNSUPPORTED.items():
        if raw.get(field) not in _EMPTY:
            raise ConfigError(f"{source}: {what} ({field}={raw.get(field)!r}) is not supported")
    if raw.get("bias", "none") != "none":
        raise ConfigError(f"{source}: bias={raw.get('bias')!r}; only 'none' is supported")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= 1024:
        raise ConfigError(f"{source}: r={rank!r} must be an integer in 1..1024")
    alpha = raw.get("lora_alpha", 8)
    if (
        not isinstance(alpha, int | float)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ConfigError(f"{source}: lora_alpha={alpha!r} must be a positive number")
    if raw.get("use_rslora"):
        alpha = float(alpha) * math.sqrt(rank)  # scaling alpha/sqrt(r) == (alpha sqrt(r)) / r
    dropout = raw.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ConfigError(f"{source}: lora_dropout={dropout!r} must be in [0, 1)")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if not _MODULE_NAME.match(targets):
            raise ConfigError(f"{source}: target_modules is a regular expression; give a list of names")
        targets = [targets]
    if not isinstance(targets, list) or not targets or len(targets) > 64:
        raise ConfigError(f"{source}: target_modules must be a list of 1..64 module names")
    if not all(isinstance(t, str) and _MODULE_NAME.match(t) for t in targets):
        raise ConfigError(f"{source}: target_modules must be plain module names, got {targets[:5]!r}")
    return LoraSpec(
        rank=rank, alpha=float(alpha), dropout=float(dropout), target_modules=tuple(sorted(set(targets)))
    )


def _max_weights_bytes(template: Mapping[str, tuple[int, ...]]) -> int:
    return BYTES_PER_PARAM * sum(math.prod(s) for s in template.values()) + HEADER_SLACK


def _read_weights(path: Path, template: Mapping[str, tuple[int, ...]]) -> StateDict:
    from safetensors import safe_open
    from safetensors.torch import load

    if not path.is_file():
        raise ConfigError(
            f"{path.parent}: no {WEIGHTS_FILE} (adapter_model.bin is not read: pickles run code)"
        )
    size, cap = path.stat().st_size, _max_weights_bytes(template)
    if size > cap:
        raise ConfigError(f"{path}: {size} bytes, more than this adapter can need ({cap})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
        _check_names(names, template)
        raw = load(path.read_bytes())
    except ConfigError:
        raise
    except Exception as err:  # safetensors raises its own errors on malformed files
        raise ConfigError(f"{path}: not a valid safetensors file: {err}") from None
    return raw


def _check_names(names: set[str], template: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(template) - names)
    extra = sorted(names - set(template))
    if missing or extra:
        raise ConfigError(
            f"the adapter's tensors differ from the federation's LoRA config on this base: "
            f"{len(missing)} missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )


def validate_state(state: Mapping[str, torch.Tensor], template: Mapping[str, tuple[int, ...]]) -> StateDict:
    """Exactly ``template``'s names and shapes, floating point, finite, ``|x| <= MAX_ABS_VALUE``; fp32."""
    _check_names(set(state), template)
    out: StateDict = {}
    for name in sorted(template):
        tensor = state[name]
        if not tensor.is_floating_point():
            raise ConfigError(f"{name}: dtype {tensor.dtype} is not floating point")
        if tuple(tensor.shape) != tuple(template[name]):
            raise ConfigError(f"{name}: shape {tuple(tensor.shape)}, the base needs {tuple(template[name])}")
        value = tensor.to(torch.float32).contiguous()
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"{name}: non-finite values (NaN/Inf)")
        peak = float(value.abs().max()) if value.numel() else 0.0
        if peak > MAX_ABS_VALUE:
            raise ConfigError(f"{name}: values up to {peak:g} exceed {MAX_ABS_VALUE:g}")
        out[name] = value
    return out


def read_peft_dir(directory: Path) -> tuple[LoraSpec, dict[str, Any]]:
    """The LoRA config of a PEFT directory (cheap: no weights read), and its raw config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    raw = _read_config(directory)
    return lora_from_config(raw, str(directory / CONFIG_FILE)), raw


def load_peft_dir(directory: Path, template: Mapping[str, tuple[int, ...]]) -> ImportedAdapter:
    """Read and check a PEFT directory against ``template`` (the federation's v0 names and shapes)."""
    directory = Path(directory)
    lora, raw = read_peft_dir(directory)
    state = validate_state(_read_weights(directory / WEIGHTS_FILE, template), template)
    check_state(state, lora)  # PEFT names, A/B pairs, rank r, target modules
    name = raw.get("base_model_name_or_path")
    return ImportedAdapter(lora=lora, state=state, base_model_name=name if isinstance(name, str) else None)


def reconcile(given: LoraSpec | None, imported: LoraSpec) -> LoraSpec:
    """The federation's LoRA spec: the adapter's, or ``given`` when both agree on what fixes the
    tensors and the arithmetic (rank, targets, alpha); :class:`ConfigError` naming the difference."""
    if given is None:
        return imported
    diffs = []
    if given.rank != imported.rank:
        diffs.append(f"rank {given.rank} != adapter r {imported.rank}")
    if set(given.target_modules) != set(imported.target_modules):
        diffs.append(f"targets {sorted(given.target_modules)} != adapter {sorted(imported.target_modules)}")
    if not math.isclose(given.alpha, imported.alpha, rel_tol=1e-9):
        diffs.append(f"alpha {given.alpha:g} != adapter lora_alpha {imported.alpha:g}")
    if diffs:
        raise ConfigError("the adapter does not match the federation's LoRA config: " + "; ".join(diffs))
    return given
