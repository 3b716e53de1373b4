"""``pfi edge run | flush``: one real edge agent, and draining its outbox.

A device talks only to the personalization service (``PFI_EDGE_SERVICE_URL``): it enrolls once with an
enrollment token (``PFI_EDGE_ENROLLMENT_TOKEN``) or uses its stored credential, fetches the spec and the
global adapter, and uploads its updates through the ingest route. No Redis, no Kafka. Defaults come from
``PFI_EDGE_*`` (:class:`~clients.settings.EdgeSettings`); flags override them.

``register`` returns the ``edge`` sub-command group so harnesses can add theirs (``pfi edge simulate``
comes from :mod:`sim.commands`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from clients.settings import EdgeSettings
from schemas.errors import ConfigError


def quiet_library_warnings() -> None:
    # transformers' deprecation notice, emitted by PEFT on every training call: noise for a CLI user.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _clip(text: str) -> float | str:
    if text.strip().lower() in ("none", "off", "0"):
        return "none"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip: a number > 0 or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("--clip must be > 0 (or 'none')")
    return value


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training and sending (defaults: PFI_EDGE_*)")
    group.add_argument("--steps", type=int, help="optimizer steps per round")
    group.add_argument("--batch-size", type=int)
    group.add_argument("--seq-len", type=int, help="tokens per packed training sequence")
    group.add_argument("--lr", type=float, help="learning rate")
    group.add_argument("--seed", type=int, help="training seed (default: random for run, 0 for simulate)")
    group.add_argument("--clip", type=_clip, help="L2 bound of the shared delta, or none")
    group.add_argument("--dp-noise", type=float, help="local DP: Gaussian noise multiplier (x clip)")
    group.add_argument("--int8", action="store_true", default=None, help="int8-quantize the delta")
    group.add_argument("--dtype", choices=("float16", "float32", "bfloat16"), help="wire dtype (no --int8)")
    group.add_argument("--base-model", help="base model to load; must be the federation's (default: it)")
    group.add_argument(
        "--state-dir", type=Path, help="credentials, personal adapters, outboxes (PFI_EDGE_STATE_DIR)"
    )
    group.add_argument("--flush-timeout", type=float, help="seconds to drain the outbox at the end")
    group.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    group.add_argument("--no-progress", action="store_true", help="no progress display on stderr")


def register(subparsers: Any) -> Any:
    """Add ``pfi edge``; returns its sub-command group (``add_parser`` for more edge commands)."""
    edge = subparsers.add_parser("edge", help="edge agents: train locally, send adapter deltas")
    sub = edge.add_subparsers(dest="edge_command", metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="one user's agent: fetch -> train -> publish, for some rounds")
    run.add_argument("--federation", required=True)
    run.add_argument("--user", required=True, help="user id in --data (the device's client id)")
    run.add_argument("--data", required=True, type=Path, help="dir of <user>.txt, JSONL or a play")
    run.add_argument("--rounds", type=int, default=1)
    run.add_argument("--interval", type=float, default=0.0, help="seconds between rounds")
    add_training_flags(run)
    run.set_defaults(func=_run_command)

    flush = sub.add_parser("flush", help="send a user's queued updates (after an outage)")
    flush.add_argument("--user", required=True)
    flush.add_argument("--federation", help="whose credential to use (default: the user's only one)")
    flush.add_argument("--state-dir", type=Path)
    flush.add_argument("--timeout", type=float, default=60.0)
    flush.set_defaults(func=_flush_command)

    edge.set_defaults(func=lambda _args: (edge.print_help(), 2)[1])
    return sub


# ------------------------------------------------------------------------------------------ helpers


def options_from_args(args: argparse.Namespace, edge: EdgeSettings) -> Any:
    from clients.agent import AgentOptions, wire_encoding

    overrides: dict[str, Any] = {}
    if args.clip is not None:
        overrides["clip_norm"] = None if args.clip == "none" else args.clip
    if args.dp_noise is not None:
        overrides["noise_multiplier"] = args.dp_noise
    if args.int8 is not None or args.dtype is not None:
        overrides["encoding"] = wire_encoding(args.dtype or edge.dtype, int8=bool(args.int8 or edge.int8))
    return AgentOptions.from_settings(edge, **overrides)


def train_cfg_from_args(args: argparse.Namespace, edge: EdgeSettings, seed: int) -> Any:
    from clients.agent import train_config

    return train_config(
        edge, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=seed
    )


def _state_dir(args: argparse.Namespace, edge: EdgeSettings) -> Path:
    return Path(args.state_dir) if args.state_dir is not None else edge.resolved_state_dir()


def _service_url(edge: EdgeSettings) -> str:
    if not edge.service_url:
        raise ConfigError(
            "PFI_EDGE_SERVICE_URL is not set: a device fetches the global adapter from and uploads its "
            "updates to the personalization service"
        )
    return edge.service_url


# ---------------------------------------------------------------------------------------------- run


async def _personalize(
    agent: Any, source: Any, data: Any, cfg: Any, edge: EdgeSettings, progress: Any
) -> dict[str, Any]:
    """The personalization step after the rounds (``PFI_EDGE_PERSONALIZE_STEPS`` > 0): fit, gate and
    upload the personal adapter."""
    from clients.personalize import PersonalizeConfig

    pcfg = PersonalizeConfig(
        steps=edge.personalize_steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=edge.personalize_lr,
        seed=cfg.seed,
    )
    result, version = await agent.personalize(data, pcfg)
    info = await source.upload_personal(
        agent.federation, agent.user_id, result.personal, trained_against=version, gate=result.gate
    )
    progress.write(
        f"personalized against v{version}: {result.steps} steps, gate {result.gate:g} (validation NLL "
        f"{result.val_nll[0.0]:.4f} -> {result.val_nll[result.gate]:.4f}); uploaded as version "
        f"{info.get('version')}"
    )
    return {
        "gate": result.gate,
        "trained_against": version,
        "steps": result.steps,
        "val_nll": {f"{g:g}": v for g, v in result.val_nll.items()},
        "adapter_version": info.get("version"),
    }


async def _run(args: argparse.Namespace) -> int:
    from clients.agent import EdgeAgent, SpecMismatchError
    from clients.data import UserData, load_users
    from clients.enrollment import DeviceIdentity
    from clients.http_source import HttpGlobalSource
    from clients.outbox import Outbox
    from clients.progress import Progress
    from clients.training import AdapterTrainer
    from clients.uploader import HttpUpdateSender
    from modeling.base import load_base_model

    edge = EdgeSettings()
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1")
    url = _service_url(edge)
    state_dir = _state_dir(args, edge)
    options = options_from_args(args, edge)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    cfg = train_cfg_from_args(args, edge, seed)
    users = load_users(args.data)
    if args.user not in users:
        some = ", ".join(list(users)[:5])
        raise ConfigError(f"user {args.user!r} is not in {args.data} ({len(users)} users: {some}, ...)")
    data = UserData.from_text(args.user, users[args.user], heldout_fraction=edge.heldout_fraction)

    identity = await DeviceIdentity.obtain(edge, args.federation, args.user, state_dir=state_dir)
    source = HttpGlobalSource(url, identity.token, timeout_s=edge.http_timeout_s)
    sender = HttpUpdateSender(url, identity.token, refresh=identity.refresh, timeout_s=edge.http_timeout_s)
    results: list[dict[str, Any]] = []
    personalized: dict[str, Any] | None = None
    progress = Progress(
        desc=f"edge {args.user}", total=args.rounds, unit="rounds", enabled=not args.no_progress
    )
    try:
        spec = await source.spec(args.federation)
        model_id = args.base_model or spec.base_model
        if model_id != spec.base_model:
            raise SpecMismatchError(
                f"federation {spec.name!r} trains {spec.base_model!r}, not {model_id!r}; refusing to train"
            )
        progress.write(f"loading base model {model_id} ...")
        base = await asyncio.to_thread(load_base_model, model_id)
        trainer = AdapterTrainer(base, spec)
        outbox = Outbox(
            state_dir / args.user / "outbox", max_bytes=edge.outbox_max_bytes, max_items=edge.outbox_max_items
        )
        if len(outbox):
            progress.write(f"{len(outbox)} update(s) queued from an earlier run; sending them first")
        agent = EdgeAgent(
            args.federation, args.user, identity.key, source, trainer, outbox, sender, state_dir, options,
            edge_settings=edge,
        )  # fmt: skip
        progress.update(0, queued=len(outbox))
        for index in range(args.rounds):
            round_cfg = replace(cfg, seed=(seed + index) & 0x7FFFFFFF)
            result = await agent.run_round(data, round_cfg)
            results.append(result.to_dict())
            state = "published" if result.published else f"queued ({result.send_error})"
            progress.write(
                f"round {index + 1}/{args.rounds}: trained on v{result.base_version}, {result.loss_on} loss "
                f"{result.loss_before:.4f} -> {result.loss_after:.4f} in {result.train_seconds:.1f}s; "
                f"delta norm {result.delta_norm:.3g}{' (clipped)' if result.clipped else ''}, "
                f"{result.message_bytes} bytes, {state}"
            )
            progress.update(
                index + 1,
                v=result.base_version,
                loss=f"{result.loss_after:.3f}",
                queued=result.queued,
            )
            if args.interval > 0 and index + 1 < args.rounds:
                await asyncio.sleep(args.interval)
        if edge.personalize_steps > 0:
            personalized = await _personalize(agent, source, data, cfg, edge, progress)
        timeout = args.flush_timeout if args.flush_timeout is not None else edge.flush_timeout_s
        leftover = await agent.flush(timeout)
        rejected = len(outbox.rejected())
    finally:
        progress.close()
        await sender.close()
        await source.aclose()
        await identity.aclose()
    summary = {
        "federation": args.federation,
        "user": args.user,
        "client_id": identity.client_id,
        "seed": seed,
        "rounds": results,
        "personalize": personalized,
        "published": sum(1 for r in results if r["published"]) + leftover.sent,
        "queued": leftover.remaining,
        "rejected": rejected,
        "outbox": str(state_dir / args.user / "outbox"),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    if leftover.remaining:
        print(
            f"pfi edge: {leftover.remaining} update(s) still queued in {summary['outbox']} "
            f"({leftover.error}); the next `pfi edge run` or `pfi edge flush` sends them",
            file=sys.stderr,
        )
    if rejected:
        print(
            f"pfi edge: {rejected} update(s) rejected by the service (kept in outbox/rejected/)",
            file=sys.stderr,
        )
    return 0


def _run_command(args: argparse.Namespace) -> int:
    quiet_library_warnings()
    return asyncio.run(_run(args))


# -------------------------------------------------------------------------------------------- flush


def _flush_command(args: argparse.Namespace) -> int:
    from clients.credentials import CREDENTIAL_FILE
    from clients.enrollment import DeviceIdentity
    from clients.outbox import Outbox, OutboxPublisher
    from clients.uploader import HttpUpdateSender

    edge = EdgeSettings()
    url = _service_url(edge)
    state_dir = _state_dir(args, edge)
    directory = state_dir / args.user / "outbox"
    if not directory.is_dir():
        raise ConfigError(f"no outbox for user {args.user!r} at {directory}")
    federation = args.federation
    if federation is None:
        found = sorted(p.parent.parent.name for p in state_dir.glob(f"*/{args.user}/{CREDENTIAL_FILE}"))
        if len(found) != 1:
            raise ConfigError(
                f"user {args.user!r} has {len(found)} credentials under {state_dir}; "
                "name one with --federation"
            )
        federation = found[0]

    async def run() -> tuple[int, int, str | None]:
        identity = await DeviceIdentity.obtain(edge, federation, args.user, state_dir=state_dir)
        sender = HttpUpdateSender(
            url, identity.token, refresh=identity.refresh, timeout_s=edge.http_timeout_s
        )
        publisher = OutboxPublisher(
            Outbox(directory, max_bytes=edge.outbox_max_bytes, max_items=edge.outbox_max_items),
            sender,
            send_timeout_s=edge.send_timeout_s,
            retry_initial_s=edge.retry_initial_s,
            retry_max_s=edge.retry_max_s,
        )
        try:
            result = await publisher.flush(args.timeout)
        finally:
            await sender.close()
            await identity.aclose()
        return result.sent, result.remaining, result.error

    sent, remaining, error = asyncio.run(run())
    print(f"sent {sent} update(s); {remaining} still queued" + (f" ({error})" if remaining else ""))
    return 0 if remaining == 0 else 1
