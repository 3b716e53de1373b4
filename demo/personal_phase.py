"""The demo's on-device personalization step: after the federated run, each user's device fits its
personal adapter against the final global adapter and chooses its gate (:mod:`clients.personalize`),
exactly what an edge agent does after a round; the results are what the evaluation uploads."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from clients.data import UserData
from clients.personalize import PersonalizeConfig, PersonalizeResult, personalize
from clients.training import AdapterTrainer
from demo.config import DemoConfig
from modeling.lora import StateDict

Echo = Callable[[str], None]


def recipe(cfg: DemoConfig) -> PersonalizeConfig:
    """The personalization recipe of a demo run (recorded in the report)."""
    return PersonalizeConfig(
        steps=cfg.personal_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.personal_step_lr,
        validation_fraction=cfg.validation_fraction,
        eval_seq_len=cfg.eval_tokens,
        warm_start=True,
        seed=cfg.seed,
    )


async def personalize_users(
    trainer: AdapterTrainer,
    global_state: StateDict,
    personals: Mapping[str, StateDict | None],
    users: Mapping[str, UserData],
    cfg: DemoConfig,
    executor: Executor,
    echo: Echo,
) -> dict[str, PersonalizeResult]:
    """Every user's personalization step, one after the other in ``executor`` (the model's thread)."""
    loop = asyncio.get_running_loop()
    pcfg = recipe(cfg)
    out: dict[str, PersonalizeResult] = {}
    for i, user in enumerate(sorted(users), 1):
        result = await loop.run_in_executor(
            executor,
            functools.partial(personalize, trainer, global_state, personals.get(user), users[user], pcfg),
        )
        out[user] = result
        losses = ", ".join(f"{g:g}: {v:.3f}" for g, v in sorted(result.val_nll.items()))
        echo(
            f"  personalize {i}/{len(users)} {user}: {result.steps} steps, gate {result.gate:g} "
            f"(validation NLL by gate {losses}; {result.seconds:.1f}s)"
        )
    return out


def recipe_dict(cfg: DemoConfig) -> dict[str, Any]:
    pcfg = recipe(cfg)
    return {
        "steps": pcfg.steps,
        "lr": pcfg.lr,
        "batch_size": pcfg.batch_size,
        "seq_len": pcfg.seq_len,
        "validation_fraction": pcfg.validation_fraction,
        "gates": list(pcfg.gates),
        "max_validation_sequences": pcfg.max_validation_sequences,
        "eval_seq_len": pcfg.eval_seq_len,
        "warm_start": pcfg.warm_start,
        "shared": "frozen (the final global adapter)",
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "target_modules": list(cfg.target_modules),
    }
