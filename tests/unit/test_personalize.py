"""On-device personalization: the time-like split, the gate chooser and the gated personal fit (tiny
LLaMA, CPU)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from clients.agent import AgentOptions, EdgeAgent
from clients.data import UserData, split_user_text
from clients.outbox import Outbox
from clients.personal import MemoryPersonalStore
from clients.personalize import (
    PersonalizeConfig,
    choose_gate,
    gate_losses,
    gated,
    personalize,
    validation_split,
)
from clients.source import GlobalAdapter
from clients.training import AdapterTrainer
from modeling.base import TINY_LLAMA, load_base_model
from modeling.lora import StateDict, init_adapter
from schemas.errors import ConfigError
from schemas.events import FederationSpec

SPEC = FederationSpec(name="fed-personalize", base_model=TINY_LLAMA, seed=7)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# ---------------------------------------------------------------------------------------- the split


def test_tail_split_holds_out_the_last_paragraphs() -> None:
    paragraphs = [f"paragraph {i} words" for i in range(30)]
    text = "\n\n".join(paragraphs)
    train, heldout = split_user_text(text, heldout_fraction=0.2, seed="alice", mode="tail")
    assert heldout.split("\n\n") == paragraphs[24:]
    assert train.split("\n\n") == paragraphs[:24]
    # the seed plays no part in the tail split; the random split is still the default
    assert split_user_text(text, heldout_fraction=0.2, seed="bob", mode="tail") == (train, heldout)
    assert split_user_text(text, heldout_fraction=0.2, seed="alice") != (train, heldout)
    one = split_user_text("a single paragraph of several words", heldout_fraction=0.3, seed="u", mode="tail")
    assert one == ("a single paragraph of", "several words")
    with pytest.raises(ConfigError, match="split mode"):
        split_user_text(text, heldout_fraction=0.2, seed="u", mode="middle")  # type: ignore[arg-type]


def test_validation_is_the_end_of_the_training_text_never_the_heldout() -> None:
    paragraphs = [f"turn {i}" for i in range(50)]
    data = UserData.from_text("u", "\n\n".join(paragraphs), heldout_fraction=0.1, mode="tail")
    fit, validation = validation_split(data.train_text, 0.1)
    assert data.heldout_text.split("\n\n") == paragraphs[45:]
    assert fit.split("\n\n") + validation.split("\n\n") == paragraphs[:45]
    assert validation.split("\n\n") == paragraphs[41:45]  # round(0.1 * 45) = 4
    assert not set(validation.split("\n\n")) & set(data.heldout_text.split("\n\n"))


# ------------------------------------------------------------------------------------------ the gate


def test_choose_gate_never_worse_than_the_global_alone() -> None:
    assert choose_gate({0.0: 3.0, 0.5: 2.9, 1.0: 2.95}) == 0.5
    assert choose_gate({0.0: 3.0, 0.5: 3.1, 1.0: 3.2}) == 0.0
    assert choose_gate({0.0: 3.0, 0.5: 3.0, 1.0: 3.0}) == 0.0  # a tie keeps the smaller gate
    assert choose_gate({0.0: 3.0, 0.25: 2.5, 1.0: 2.5}) == 0.25
    assert choose_gate({0.0: 3.0, 0.5: math.nan, 1.0: math.inf}) == 0.0
    rng = random.Random(0)
    for _ in range(200):
        losses = {g: rng.uniform(2.0, 4.0) for g in (0.0, 0.25, 0.5, 0.75, 1.0)}
        gate = choose_gate(losses)
        assert losses[gate] <= losses[0.0]
        assert losses[gate] == min(losses.values())
    with pytest.raises(ConfigError, match="gate 0"):
        choose_gate({0.5: 1.0})


def test_gated_scales_only_b() -> None:
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.full((3, 2), 2.0)}
    half = gated(state, 0.5)
    assert torch.equal(half["m.lora_A.weight"], state["m.lora_A.weight"])
    assert torch.equal(half["m.lora_B.weight"], torch.full((3, 2), 1.0))
    assert torch.equal(gated(state, 1.0)["m.lora_B.weight"], state["m.lora_B.weight"])
    assert not gated(state, 0.0)["m.lora_B.weight"].any()
    for bad in (-0.1, 1.1, math.nan):
        with pytest.raises(ConfigError):
            gated(state, bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gates": (0.5, 1.0)},
        {"gates": ()},
        {"gates": (0.0, 1.5)},
        {"steps": -1},
        {"lr": 0.0},
        {"lr": math.inf},
        {"validation_fraction": 0.0},
        {"validation_fraction": 1.0},
        {"max_validation_sequences": 0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PersonalizeConfig(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- the personal fit


def _user(user_id: str, seed: int, paragraphs: int = 60) -> UserData:
    rng = random.Random(seed)
    words = ["ZORP", "blik", "QUANDO", "fee", "mumble", "TAK"]
    text = "\n\n".join(
        "\n".join(" ".join(rng.choice(words) for _ in range(6)) + "!" for _ in range(3))
        for _ in range(paragraphs)
    )
    return UserData.from_text(user_id, text, heldout_fraction=0.1, mode="tail")


@pytest.fixture(scope="module")
def setup() -> tuple[AdapterTrainer, StateDict]:
    base = load_base_model(TINY_LLAMA)
    v0 = init_adapter(SPEC, base.model)
    gen = torch.Generator().manual_seed(3)
    global_state = {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in v0.items()}
    return AdapterTrainer(base, SPEC), global_state


def test_personalize_fits_against_the_frozen_global_and_gates_on_validation(
    setup: tuple[AdapterTrainer, StateDict],
) -> None:
    trainer, global_state = setup
    data = _user("zorp", 1)
    cfg = PersonalizeConfig(steps=8, batch_size=4, seq_len=64, lr=1e-2, eval_seq_len=64)
    result = personalize(trainer, global_state, None, data, cfg)
    assert set(result.val_nll) == set(cfg.gates)
    assert result.gate in cfg.gates
    assert result.val_nll[result.gate] == min(result.val_nll.values())
    assert result.val_nll[result.gate] <= result.val_nll[0.0]
    assert result.val_gain >= 0.0
    assert result.val_tokens > 0
    assert result.steps == 8
    # a distinctive user: the personal adapter helps on its own validation text
    assert result.gate > 0.0
    # the personal adapter was trained (B moved from zero), the global was not touched
    assert any(v.abs().sum() > 0 for k, v in result.personal.items() if ".lora_B." in k)
    # the losses are those of global + gate * personal on the validation split
    _, validation = validation_split(data.train_text, cfg.validation_fraction)
    again, _ = gate_losses(
        trainer,
        global_state,
        result.personal,
        [validation],
        (0.0, result.gate),
        seq_len=64,
        batch_size=4,
        max_sequences=cfg.max_validation_sequences,
    )
    assert again[0.0] == pytest.approx(result.val_nll[0.0], abs=1e-6)
    assert again[result.gate] == pytest.approx(result.val_nll[result.gate], abs=1e-6)
    # warm start: continuing from the result changes it further; deterministic for the same inputs
    same = personalize(trainer, global_state, None, data, cfg)
    assert all(torch.equal(same.personal[k], result.personal[k]) for k in result.personal)
    assert same.gate == result.gate


def test_the_gate_grid_scores_a_bounded_sample_of_a_long_validation_split(
    setup: tuple[AdapterTrainer, StateDict],
) -> None:
    trainer, global_state = setup
    data = _user("long", 2, paragraphs=600)
    capped = PersonalizeConfig(steps=1, eval_seq_len=32, max_validation_sequences=3)
    result = personalize(trainer, global_state, None, data, capped)
    assert 0 < result.val_tokens <= 3 * 32
    whole = PersonalizeConfig(steps=1, eval_seq_len=32, max_validation_sequences=10_000)
    assert personalize(trainer, global_state, None, data, whole).val_tokens > 10 * result.val_tokens


class _Source:
    """A global source with one fixed version (the agent's ``GlobalSource`` protocol)."""

    def __init__(self, spec: FederationSpec, state: StateDict, version: int) -> None:
        self._spec, self._adapter = spec, GlobalAdapter(spec.name, version, state)

    async def spec(self, federation: str) -> FederationSpec:
        return self._spec

    async def latest(self, federation: str) -> GlobalAdapter:
        return self._adapter


class _NoSender:
    async def send_raw(self, federation: str, messages: list[bytes]) -> int:
        raise AssertionError("the personalization step sends nothing")


async def test_the_agent_hook_fits_against_the_latest_global_and_keeps_the_adapter(
    setup: tuple[AdapterTrainer, StateDict], tmp_path: Path
) -> None:
    trainer, global_state = setup
    store = MemoryPersonalStore()
    agent = EdgeAgent(
        SPEC.name, "zorp", b"k" * 32, _Source(SPEC, global_state, 7), trainer,
        Outbox(tmp_path / "outbox"), _NoSender(), None, AgentOptions(quality_sequences=0),
        personal_store=store,
    )  # fmt: skip
    data = _user("zorp", 1)
    cfg = PersonalizeConfig(steps=4, eval_seq_len=64)
    result, version = await agent.personalize(data, cfg)
    assert version == 7
    kept = store.load("zorp", SPEC.fingerprint())
    assert kept is not None
    assert all(torch.equal(kept[k], result.personal[k]) for k in kept)  # unscaled, whatever the gate
    assert result.val_nll[result.gate] <= result.val_nll[0.0]
    again, _ = await agent.personalize(data, cfg)  # continues from the kept adapter (warm start)
    assert any(not torch.equal(again.personal[k], result.personal[k]) for k in kept)
    with pytest.raises(ConfigError):
        await agent.personalize(_user("other", 2), cfg)
