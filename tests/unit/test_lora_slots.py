"""The batched slot LoRA of the serving stacks computes what PEFT's mixed-adapter batches compute."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from modeling.base import TINY_LLAMA, BaseModel, load_base_model
from modeling.lora import init_adapter, peft_config
from schemas.events import FederationSpec, LoraSpec, TensorEncoding, utcnow
from services.personalization.backends.base import NO_SLOT, ScoreRow
from services.personalization.backends.torch_slots.inference import score_rows
from services.personalization.backends.torch_slots.stacks import build_merged_stack, merge_global
from services.personalization.user_adapters import AdapterRecord, PersonalAdapter, to_params

ATOL = 1e-5


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return load_base_model(TINY_LLAMA)


def _spec(targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 4) -> FederationSpec:
    return FederationSpec(
        name="slots-test",
        base_model=TINY_LLAMA,
        lora=LoraSpec(rank=rank, alpha=3.0 * rank, target_modules=targets),
    )


def _state(template: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in template.items()}


def _adapter(state: dict[str, torch.Tensor], key: str) -> PersonalAdapter:
    record = AdapterRecord(
        federation="slots-test",
        user_id=key,
        version=1,
        trained_against=0,
        created_at=utcnow(),
        digest="0" * 64,
        size_bytes=1,
        num_tensors=len(state),
        num_parameters=sum(t.numel() for t in state.values()),
        upload_encoding=TensorEncoding(),
    )
    return PersonalAdapter(key=key, record=record, params=to_params(state), nbytes=0)


def _peft_reference(
    base: BaseModel, spec: FederationSpec, global_state: dict[str, torch.Tensor], users: dict[str, Any]
) -> Any:
    """Base + merged global, then each user's adapter as a named PEFT adapter (mixed batches)."""
    from peft import get_peft_model, set_peft_model_state_dict

    merged = merge_global(base, spec, global_state)
    model = get_peft_model(copy.deepcopy(merged), peft_config(spec.lora), adapter_name="__unused__")
    for name, state in users.items():
        model.add_adapter(name, peft_config(spec.lora))
        set_peft_model_state_dict(model, state, adapter_name=name)
    model.eval()
    return model


@pytest.mark.parametrize(
    "targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")]
)
def test_mixed_batch_matches_peft(base: BaseModel, targets: tuple[str, ...]) -> None:
    spec = _spec(targets)
    template = init_adapter(spec, base.model)
    global_state = {k: v + (0.02 if ".lora_B." in k else 0.0) for k, v in template.items()}
    users = {f"u{i}": _state(template, 10 + i) for i in range(3)}
    reference = _peft_reference(base, spec, global_state, users)
    stack = build_merged_stack(base, spec, 0, global_state, slots=4)
    adapters = {name: _adapter(state, name) for name, state in users.items()}

    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (6, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # padding in one row
    # rows: u0, none, u1, u0, u2, none  (different users, repeated users, rows with no adapter)
    row_users: list[str | None] = ["u0", None, "u1", "u0", "u2", None]
    names = ["__base__" if u is None else u for u in row_users]
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        with stack.serving([None if u is None else adapters[u] for u in row_users]):
            got = stack.model(input_ids=ids, attention_mask=mask).logits
        plain = stack.model(input_ids=ids, attention_mask=mask).logits  # routing cleared: base + global
        base_global = reference(input_ids=ids, attention_mask=mask, adapter_names=["__base__"] * 6).logits
    assert torch.allclose(got, expected, atol=ATOL), float((got - expected).abs().max())
    assert torch.allclose(plain, base_global, atol=ATOL)
    # the personal adapters do change the output of their rows, and only of their rows
    personal_rows = [i for i, u in enumerate(row_users) if u is not None]
    assert float((got[personal_rows] - plain[personal_rows]).abs().max()) > 1e-3
    assert torch.equal(got[[1, 5]], plain[[1, 5]])


@pytest.mark.parametrize("row_users", [["u0"], ["u1", "u1", "u1"], [None, "u2", None], ["u0", "u1"]])
def test_single_adapter_and_subset_paths_match_peft(base: BaseModel, row_users: list[str | None]) -> None:
    spec = _spec()
    template = init_adapter(spec, base.model)
    users = {f"u{i}": _state(template, 20 + i) for i in range(3)}
    reference = _peft_reference(base, spec, template, users)
    stack = build_merged_stack(base, spec, 0, template, slots=2)
    adapters = {name: _adapter(state, name) for name, state in users.items()}
    ids = torch.randint(0, 256, (len(row_users), 9), generator=torch.Generator().manual_seed(5))
    names = ["__base__" if u is None else u for u in row_users]
    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=names).logits
        with stack.serving([None if u is None else adapters[u] for u in row_users]):
            got = stack.model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=ATOL), float((got - expected).abs().max())


def test_slots_are_reused_lru_and_evicted_adapters_are_zeroed(base: BaseModel) -> None:
    spec = _spec()
    template = init_adapter(spec, base.model)
    stack = build_merged_stack(base, spec, 0, template, slots=2)
    a, b, c = (_adapter(_state(template, 30 + i), f"k{i}") for i in range(3))
    assert stack.bind([a, None, b]) == [0, NO_SLOT, 1]
    assert stack.bind([b]) == [1]
    assert stack.binds == 2  # already bound: no copy
    assert stack.bind([c]) == [0]  # a was the least recently used
    with pytest.raises(RuntimeError):
        stack.bind([a, b, c])
    c.evicted = True
    stack.release_evicted()
    assert stack.bound_adapters() == [b]
    layer, kind = next(iter(stack._layers.values()))
    assert not bool(getattr(layer, kind)[0].any())  # the evicted copy is gone from the model


def test_score_rows_with_generated_rows_matches_separate_requests(base: BaseModel) -> None:
    """A mixed batch scores each row as if it had been served alone."""
    spec = _spec()
    template = init_adapter(spec, base.model)
    stack = build_merged_stack(base, spec, 0, template, slots=4)
    a, b = (_adapter(_state(template, 40 + i), f"k{i}") for i in range(2))
    rows = [
        ScoreRow([256, *b"hello there"], a),
        ScoreRow([256, *b"hi"], None),
        ScoreRow([256, *b"good morrow, cousin"], b),
    ]
    together = score_rows(stack, rows)
    alone = [score_rows(stack, [row])[0] for row in rows]
    for x, y in zip(together, alone, strict=True):
        assert x.tokens == y.tokens
        assert abs(x.nll_sum - y.nll_sum) < 1e-3


def test_merge_global_equals_peft_merge_and_unload(base: BaseModel) -> None:
    from peft import get_peft_model, set_peft_model_state_dict

    spec = _spec(("q_proj", "v_proj", "down_proj"))
    template = init_adapter(spec, base.model)
    state = _state(template, 50)
    peft = get_peft_model(copy.deepcopy(base.model), peft_config(spec.lora), adapter_name="g")
    set_peft_model_state_dict(peft, state, adapter_name="g")
    expected = peft.merge_and_unload().state_dict()
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    got = merge_global(base, spec, state).state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-6), key
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert changed
    assert all(k.rsplit(".", 2)[-2] in spec.lora.target_modules for k in changed)
    assert all(torch.equal(v, before[k]) for k, v in base.model.state_dict().items())  # base untouched
