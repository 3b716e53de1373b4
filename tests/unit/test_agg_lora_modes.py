"""FedIT vs FFA-LoRA: what is shared, and which merge is exact."""

from __future__ import annotations

import pytest
import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from services.aggregator.math.fedbuff import BufferedUpdate, aggregate
from services.aggregator.math.lora_modes import is_lora_a, is_lora_b, merged_product, project_delta

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"
A_KEY, B_KEY = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"
D_OUT, D_IN, RANK = 12, 10, 3


def test_key_classification() -> None:
    assert is_lora_a(A_KEY)
    assert not is_lora_b(A_KEY)
    assert is_lora_b(B_KEY)
    assert not is_lora_a(B_KEY)
    assert is_lora_a("m.q_proj.lora_A.default.weight")
    assert is_lora_b("m.embed_tokens.lora_embedding_B")
    assert not is_lora_a("m.lora_Alpha.weight")
    assert not is_lora_b("m.classifier.weight")


def test_project_fedit_keeps_all_ffa_drops_a() -> None:
    delta = {A_KEY: torch.ones(RANK, D_IN), B_KEY: torch.ones(D_OUT, RANK), "m.score.weight": torch.ones(2)}
    assert set(project_delta(delta, "fedit")) == set(delta)
    assert set(project_delta(delta, "ffa")) == {B_KEY, "m.score.weight"}
    with pytest.raises(ValueError, match="unknown LoRA"):
        project_delta(delta, "flora")  # type: ignore[arg-type]


def test_merged_product() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(RANK, D_IN, generator=gen), torch.randn(D_OUT, RANK, generator=gen)
    state = {A_KEY: a, B_KEY: b, "other.q_proj.lora_A.weight": a}
    torch.testing.assert_close(merged_product(state, PREFIX), b @ a)
    with pytest.raises(KeyError):
        merged_product(state, "base_model.model.model.layers.0.self_attn")  # ambiguous / absent B


def _clients(gen: torch.Generator, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (torch.randn(RANK, D_IN, generator=gen), torch.randn(D_OUT, RANK, generator=gen)) for _ in range(n)
    ]


def test_ffa_average_of_b_is_exact_with_frozen_a() -> None:
    gen = torch.Generator().manual_seed(1)
    a0 = torch.randn(RANK, D_IN, generator=gen)
    bs = [b for _, b in _clients(gen, 5)]
    avg_of_products = torch.stack([b @ a0 for b in bs]).mean(0)
    product_of_avg = torch.stack(bs).mean(0) @ a0
    torch.testing.assert_close(product_of_avg, avg_of_products, rtol=1e-5, atol=1e-6)


def test_fedit_average_of_factors_is_inexact() -> None:
    gen = torch.Generator().manual_seed(2)
    clients = _clients(gen, 5)
    avg_of_products = torch.stack([b @ a for a, b in clients]).mean(0)
    product_of_avg = torch.stack([b for _, b in clients]).mean(0) @ torch.stack([a for a, _ in clients]).mean(
        0
    )
    gap = float((product_of_avg - avg_of_products).norm() / avg_of_products.norm())
    assert gap > 0.1


def _aggregate_clients(mode: str) -> tuple[StateDict, StateDict, list[StateDict]]:
    gen = torch.Generator().manual_seed(3)
    a0 = torch.randn(RANK, D_IN, generator=gen)
    global_state = {A_KEY: a0, B_KEY: torch.zeros(D_OUT, RANK)}
    clients = _clients(gen, 4)
    # each client trains B (and, unless FFA, A) from the global
    locals_ = [{A_KEY: a0 + (0.0 if mode == "ffa" else 1.0) * a, B_KEY: b} for a, b in clients]
    buffer = [
        BufferedUpdate(f"u{i}", f"c{i}", {k: loc[k] - global_state[k] for k in loc}, 10, 0)
        for i, loc in enumerate(locals_)
    ]
    spec = AggregationSpec(
        lora_mode=mode,
        staleness="constant",
        weighting="uniform",
        max_update_norm=None,
        allow_unbounded_norm=True,
    )
    return global_state, aggregate(global_state, buffer, spec).new_global, locals_


def test_ffa_aggregation_is_exact_and_keeps_a_frozen() -> None:
    global_state, new_global, locals_ = _aggregate_clients("ffa")
    assert torch.equal(new_global[A_KEY], global_state[A_KEY])
    expected = torch.stack([merged_product(loc, PREFIX) for loc in locals_]).mean(0)
    torch.testing.assert_close(merged_product(new_global, PREFIX), expected, rtol=1e-5, atol=1e-5)


def test_ffa_ignores_a_deltas_a_client_should_not_send() -> None:
    a0, b = torch.ones(RANK, D_IN), torch.zeros(D_OUT, RANK)
    delta = {A_KEY: torch.full((RANK, D_IN), 5.0), B_KEY: torch.ones(D_OUT, RANK)}
    spec = AggregationSpec(lora_mode="ffa", max_update_norm=None, allow_unbounded_norm=True)
    out = aggregate({A_KEY: a0, B_KEY: b}, [BufferedUpdate("u", "c", delta, 1, 0)], spec)
    assert torch.equal(out.new_global[A_KEY], a0)
    assert set(out.applied_delta) == {B_KEY}


def test_fedit_aggregation_is_inexact() -> None:
    _, new_global, locals_ = _aggregate_clients("fedit")
    expected = torch.stack([merged_product(loc, PREFIX) for loc in locals_]).mean(0)
    got = merged_product(new_global, PREFIX)
    assert float((got - expected).norm() / expected.norm()) > 0.1
