"""Local training of shared + personal LoRA adapters on one reused PEFT model (tiny LLaMA, CPU)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from clients.data import UserData, load_users
from clients.training import PERSONAL, SHARED, AdapterTrainer, TrainConfig
from modeling.base import TINY_LLAMA, load_base_model
from modeling.lora import StateDict, init_adapter
from schemas.errors import ConfigError
from schemas.events import FederationSpec

SHAKESPEARE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "shakespeare" / "tinyshakespeare.txt"
)
SPEC = FederationSpec(name="fed-test", base_model=TINY_LLAMA, seed=7)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
CFG = TrainConfig(steps=6, batch_size=4, seq_len=64, lr=1e-2, seed=3)


def _synthetic_user(user_id: str, seed: int, paragraphs: int = 40) -> UserData:
    """A user with a distinctive style: a small vocabulary of shouted, rhythmic lines."""
    rng = random.Random(seed)
    words = ["ZORP", "blik", "QUANDO", "fee", "mumble", "TAK"]
    text = "\n\n".join(
        "\n".join(" ".join(rng.choice(words) for _ in range(6)) + "!" for _ in range(3))
        for _ in range(paragraphs)
    )
    return UserData.from_text(user_id, text, heldout_fraction=0.2)


def _fresh() -> tuple[AdapterTrainer, StateDict]:
    base = load_base_model(TINY_LLAMA)
    global_v0 = init_adapter(SPEC, base.model)  # before the trainer injects its LoRA layers
    return AdapterTrainer(base, SPEC), global_v0


def _nonzero_global(global_v0: StateDict, seed: int = 11) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in global_v0.items()}


@pytest.fixture(scope="module")
def setup() -> tuple[AdapterTrainer, StateDict]:
    return _fresh()


def test_slot_keys_match_init_adapter(setup: tuple[AdapterTrainer, StateDict]) -> None:
    from peft import get_peft_model_state_dict

    trainer, global_v0 = setup
    for slot in (SHARED, PERSONAL):
        state = get_peft_model_state_dict(trainer.model, adapter_name=slot)
        assert list(state) == list(global_v0)
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in global_v0.items()}
    assert trainer.keys == list(global_v0)
    fresh = trainer.fresh_adapter("u", 1)
    assert all(torch.equal(fresh[k], trainer.fresh_adapter("u", 1)[k]) for k in fresh)
    assert all(not v.any() for k, v in fresh.items() if ".lora_B." in k)  # a fresh adapter is a no-op
    assert not torch.equal(fresh[trainer.keys[0]], trainer.fresh_adapter("v", 1)[trainer.keys[0]])


def test_both_adapters_active_and_trainable(setup: tuple[AdapterTrainer, StateDict]) -> None:
    trainer, _ = setup
    trainer._activate([SHARED, PERSONAL])
    assert trainer.model.base_model.active_adapters == [SHARED, PERSONAL]
    lora = {n: p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(trainer.keys)
    assert all(lora.values())
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_training_lowers_heldout_loss() -> None:
    if SHAKESPEARE.exists():
        text = load_users(SHAKESPEARE)["menenius"]
        data = UserData.from_text("menenius", text, heldout_fraction=0.1)
    else:
        data = _synthetic_user("zorp", 1)
    trainer, global_v0 = _fresh()
    both = [data.heldout_text]
    before = trainer.evaluate({SHARED: global_v0, PERSONAL: None}, both, seq_len=128)
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=128, lr=1e-2, seed=0)
    result = trainer.train(global_v0, None, data, cfg)
    shared = {k: global_v0[k] + result.shared_delta[k] for k in global_v0}
    after = trainer.evaluate({SHARED: shared, PERSONAL: result.personal}, both, seq_len=128)
    assert result.loss_on == "heldout"
    assert result.loss_after < result.loss_before - 0.1
    assert after.mean_nll < before.mean_nll - 0.1
    assert after.token_accuracy > before.token_accuracy
    assert abs(after.mean_nll - result.loss_after) < 0.05  # same held-out text (loss_after: first 16 rows)
    assert result.steps == 40
    assert result.seconds > 0
    assert result.num_samples == data.num_samples(128)


def test_delta_keys_personal_changes_base_frozen() -> None:
    base = load_base_model(TINY_LLAMA)
    global_v0 = init_adapter(SPEC, base.model)
    base_before = {k: v.clone() for k, v in base.model.state_dict().items()}
    trainer = AdapterTrainer(base, SPEC)
    data = _synthetic_user("u1", 2)
    personal0 = trainer.fresh_adapter("u1", "given")
    result = trainer.train(global_v0, personal0, data, CFG)

    assert list(result.shared_delta) == list(global_v0)
    assert all(result.shared_delta[k].shape == v.shape for k, v in global_v0.items())
    assert all(result.shared_delta[k].dtype == torch.float32 for k in global_v0)
    assert any(v.abs().sum() > 0 for v in result.shared_delta.values())
    assert list(result.personal) == list(global_v0)
    assert any(not torch.equal(result.personal[k], personal0[k]) for k in personal0)
    assert result.num_samples == data.num_samples(CFG.seq_len)

    after = {
        k.replace("base_model.model.", "", 1).replace(".base_layer", ""): v
        for k, v in trainer.model.state_dict().items()
        if "lora_" not in k
    }
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], v) for k, v in base_before.items())


def test_ffa_freezes_shared_a(setup: tuple[AdapterTrainer, StateDict]) -> None:
    trainer, global_v0 = setup
    start = _nonzero_global(global_v0)
    result = trainer.train(
        start, None, _synthetic_user("u2", 3), TrainConfig(**{**CFG.__dict__, "ffa": True})
    )
    a_keys = [k for k in start if ".lora_A." in k]
    b_keys = [k for k in start if ".lora_B." in k]
    assert a_keys
    assert b_keys
    assert all(not result.shared_delta[k].any() for k in a_keys)
    assert all(result.shared_delta[k].any() for k in b_keys)


def test_train_flags(setup: tuple[AdapterTrainer, StateDict]) -> None:
    trainer, global_v0 = setup
    data = _synthetic_user("u3", 4)
    personal0 = trainer.fresh_adapter("x")
    only_personal = trainer.train(
        global_v0, personal0, data, TrainConfig(**{**CFG.__dict__, "train_shared": False})
    )
    assert all(not v.any() for v in only_personal.shared_delta.values())
    assert any(not torch.equal(only_personal.personal[k], personal0[k]) for k in personal0)
    only_shared = trainer.train(
        global_v0, personal0, data, TrainConfig(**{**CFG.__dict__, "train_personal": False})
    )
    assert all(torch.equal(only_shared.personal[k], personal0[k]) for k in personal0)
    assert any(v.any() for v in only_shared.shared_delta.values())


def test_no_state_leaks_between_users() -> None:
    trainer, global_v0 = _fresh()
    start = _nonzero_global(global_v0)
    user1, user2 = _synthetic_user("alice", 5), _synthetic_user("bob", 6)
    trainer.train(start, None, user1, CFG)
    second = trainer.train(start, None, user2, CFG)
    again = trainer.train(start, None, user2, CFG)

    fresh_trainer, _ = _fresh()
    reference = fresh_trainer.train(start, None, user2, CFG)
    for result in (second, again):
        assert all(torch.equal(result.shared_delta[k], reference.shared_delta[k]) for k in start)
        assert all(torch.equal(result.personal[k], reference.personal[k]) for k in start)
        assert result.loss_after == reference.loss_after
        assert result.loss_before == reference.loss_before


def test_evaluate_adapter_combinations(setup: tuple[AdapterTrainer, StateDict]) -> None:
    trainer, global_v0 = setup
    texts = [_synthetic_user("u4", 8).heldout_text, "short text"]
    base_only = trainer.evaluate({}, texts, seq_len=64)
    assert base_only.tokens > 0
    assert 0.0 <= base_only.token_accuracy <= 1.0
    # v0 has B = 0: a no-op, so global-only equals base-only exactly
    assert trainer.evaluate({SHARED: global_v0}, texts, seq_len=64) == base_only
    assert trainer.evaluate({SHARED: None, PERSONAL: None}, texts, seq_len=64) == base_only
    g = _nonzero_global(global_v0)
    global_only = trainer.evaluate({SHARED: g}, texts, seq_len=64)
    assert global_only.mean_nll != base_only.mean_nll
    p = _nonzero_global(global_v0, seed=12)
    local_only = trainer.evaluate({PERSONAL: p}, texts, seq_len=64)
    both = trainer.evaluate({SHARED: g, PERSONAL: p}, texts, seq_len=64)
    assert len({base_only.mean_nll, global_only.mean_nll, local_only.mean_nll, both.mean_nll}) == 4
    assert trainer.evaluate({}, texts, seq_len=64) == base_only  # disabling restores the base exactly
    assert both.tokens == base_only.tokens


def test_errors(setup: tuple[AdapterTrainer, StateDict]) -> None:
    trainer, global_v0 = setup
    data = _synthetic_user("u5", 9)
    with pytest.raises(ConfigError, match="keys differ"):
        trainer.train({k: v for k, v in list(global_v0.items())[1:]}, None, data, CFG)
    bad = dict(global_v0)
    first = next(iter(bad))
    bad[first] = torch.zeros(1, 2)
    with pytest.raises(ConfigError, match="shape"):
        trainer.train(bad, None, data, CFG)
    with pytest.raises(ConfigError, match="unknown adapter slots"):
        trainer.evaluate({"other": global_v0}, ["text"])
    with pytest.raises(ConfigError, match="no training text"):
        trainer.train(global_v0, None, UserData("u", "", "held"), CFG)
    with pytest.raises(ConfigError, match="TrainConfig"):
        TrainConfig(steps=-1)
    with pytest.raises(ConfigError, match="federation's"):
        AdapterTrainer(load_base_model(TINY_LLAMA), FederationSpec(name="x", base_model="other"))
