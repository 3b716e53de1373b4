"""``pfi edge run | simulate | flush``: one real edge agent, a fleet of virtual ones, draining an outbox.

Defaults come from ``PFI_EDGE_*`` (:class:`~services.settings.EdgeSettings`); flags override them.
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

from schemas.errors import ConfigError
from services.settings import EdgeSettings, PFISettings


def _quiet_library_warnings() -> None:
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


def _add_training_flags(parser: argparse.ArgumentParser) -> None:
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
        "--state-dir", type=Path, help="keys, personal adapters, outboxes (PFI_EDGE_STATE_DIR)"
    )
    group.add_argument("--flush-timeout", type=float, help="seconds to drain the outbox at the end")
    group.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    group.add_argument("--no-progress", action="store_true", help="no progress display on stderr")


def register(subparsers: Any) -> None:
    edge = subparsers.add_parser("edge", help="edge agents: train locally, send adapter deltas")
    sub = edge.add_subparsers(dest="edge_command", metavar="SUBCOMMAND")

    run = sub.add_parser("run", help="one user's agent: fetch -> train -> publish, for some rounds")
    run.add_argument("--federation", required=True)
    run.add_argument("--user", required=True, help="user id in --data")
    run.add_argument("--data", required=True, type=Path, help="dir of <user>.txt, JSONL or a play")
    run.add_argument("--rounds", type=int, default=1)
    run.add_argument("--interval", type=float, default=0.0, help="seconds between rounds")
    _add_training_flags(run)
    run.set_defaults(func=_run_command)

    sim = sub.add_parser("simulate", help="many virtual agents in one process (one shared base model)")
    sim.add_argument("--federation", required=True)
    sim.add_argument("--data", required=True, type=Path)
    sim.add_argument("--clients", required=True, type=int)
    stop = sim.add_mutually_exclusive_group(required=True)
    stop.add_argument("--duration", type=float, help="seconds to run")
    stop.add_argument("--updates", type=int, help="stop after M published updates")
    sim.add_argument("--speed-dist", default="lognormal:0.5", help="lognormal:SIGMA or constant")
    sim.add_argument("--dropout", type=float, default=0.1, help="probability a client is offline per round")
    sim.add_argument("--offline", type=float, default=1.0, help="mean seconds offline after a dropout")
    sim.add_argument("--network-delay", type=float, default=0.02, help="max seconds of delay per hop")
    sim.add_argument("--max-active", type=int, default=2, help="clients fetching/training at once")
    sim.add_argument("--min-chars", type=int, default=0, help="skip users with less text")
    _add_training_flags(sim)
    sim.set_defaults(func=_simulate_command)

    flush = sub.add_parser("flush", help="send a user's queued updates (after a broker outage)")
    flush.add_argument("--user", required=True)
    flush.add_argument("--state-dir", type=Path)
    flush.add_argument("--timeout", type=float, default=60.0)
    flush.set_defaults(func=_flush_command)

    edge.set_defaults(func=lambda _args: (edge.print_help(), 2)[1])


# ------------------------------------------------------------------------------------------ helpers


def _options(args: argparse.Namespace, edge: EdgeSettings) -> Any:
    from clients.agent import AgentOptions, wire_encoding

    overrides: dict[str, Any] = {}
    if args.clip is not None:
        overrides["clip_norm"] = None if args.clip == "none" else args.clip
    if args.dp_noise is not None:
        overrides["noise_multiplier"] = args.dp_noise
    if args.int8 is not None or args.dtype is not None:
        overrides["encoding"] = wire_encoding(args.dtype or edge.dtype, int8=bool(args.int8 or edge.int8))
    return AgentOptions.from_settings(edge, **overrides)


def _train_cfg(args: argparse.Namespace, edge: EdgeSettings, seed: int) -> Any:
    from clients.agent import train_config

    return train_config(
        edge, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=seed
    )


def _state_dir(args: argparse.Namespace, edge: EdgeSettings, settings: PFISettings) -> Path:
    return Path(args.state_dir) if args.state_dir is not None else edge.resolved_state_dir(settings)


def _redis_error(settings: PFISettings, err: Exception) -> ConfigError:
    return ConfigError(f"cannot reach Redis at {settings.redis()}: {err}")


# ---------------------------------------------------------------------------------------------- run


async def _run(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from clients.agent import EdgeAgent, KafkaSender, SpecMismatchError, ensure_client_key
    from clients.data import UserData, load_users
    from clients.http_source import HttpGlobalSource
    from clients.outbox import Outbox
    from clients.progress import Progress
    from clients.source import GlobalSource, RedisGlobalSource
    from clients.training import AdapterTrainer
    from modeling.base import load_base_model

    settings, edge = PFISettings(), EdgeSettings()
    if args.rounds < 1:
        raise ConfigError("--rounds must be >= 1")
    state_dir = _state_dir(args, edge, settings)
    options = _options(args, edge)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    cfg = _train_cfg(args, edge, seed)
    users = load_users(args.data)
    if args.user not in users:
        some = ", ".join(list(users)[:5])
        raise ConfigError(f"user {args.user!r} is not in {args.data} ({len(users)} users: {some}, ...)")
    data = UserData.from_text(args.user, users[args.user], heldout_fraction=edge.heldout_fraction)

    redis = Redis.from_url(settings.redis())
    sender = KafkaSender(
        settings, client_id=f"pfi-edge-{args.user}"[:100], request_timeout_ms=edge.request_timeout_ms
    )
    results: list[dict[str, Any]] = []
    progress = Progress(
        desc=f"edge {args.user}", total=args.rounds, unit="rounds", enabled=not args.no_progress
    )
    source: GlobalSource | None = None
    try:
        if edge.service_url:
            # The device path: spec and global adapter over HTTP from the personalization service.
            if not edge.token:
                raise ConfigError("PFI_EDGE_SERVICE_URL is set but PFI_EDGE_TOKEN is not (pfi token issue)")
            source = HttpGlobalSource(edge.service_url, edge.token)
        else:
            source = RedisGlobalSource(redis)
        try:
            spec = await source.spec(args.federation)
        except RedisError as err:
            raise _redis_error(settings, err) from None
        model_id = args.base_model or spec.base_model
        if model_id != spec.base_model:
            raise SpecMismatchError(
                f"federation {spec.name!r} trains {spec.base_model!r}, not {model_id!r}; refusing to train"
            )
        progress.write(f"loading base model {model_id} ...")
        base = await asyncio.to_thread(load_base_model, model_id)
        trainer = AdapterTrainer(base, spec)
        key = await ensure_client_key(args.user, settings=settings, state_dir=state_dir, redis=redis)
        outbox = Outbox(
            state_dir / args.user / "outbox", max_bytes=edge.outbox_max_bytes, max_items=edge.outbox_max_items
        )
        if len(outbox):
            progress.write(f"{len(outbox)} update(s) queued from an earlier run; sending them first")
        agent = EdgeAgent(
            args.federation, args.user, key, source, trainer, outbox, sender, settings, state_dir, options,
            edge_settings=edge,
        )  # fmt: skip
        progress.update(0, queued=len(outbox))
        for index in range(args.rounds):
            round_cfg = replace(cfg, seed=(seed + index) & 0x7FFFFFFF)
            try:
                result = await agent.run_round(data, round_cfg)
            except RedisError as err:
                raise _redis_error(settings, err) from None
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
        timeout = args.flush_timeout if args.flush_timeout is not None else edge.flush_timeout_s
        leftover = await agent.flush(timeout)
    finally:
        progress.close()
        await sender.close()
        await redis.aclose()
        if isinstance(source, HttpGlobalSource):
            await source.aclose()
    summary = {
        "federation": args.federation,
        "user": args.user,
        "seed": seed,
        "rounds": results,
        "published": sum(1 for r in results if r["published"]) + leftover.sent,
        "queued": leftover.remaining,
        "outbox": str(state_dir / args.user / "outbox"),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    if leftover.remaining:
        print(
            f"pfi edge: {leftover.remaining} update(s) still queued in {summary['outbox']} "
            f"({leftover.error}); "
            "the next `pfi edge run` or `pfi edge flush` sends them",
            file=sys.stderr,
        )
    return 0


def _run_command(args: argparse.Namespace) -> int:
    _quiet_library_warnings()
    return asyncio.run(_run(args))


# ----------------------------------------------------------------------------------------- simulate


def _simulate_command(args: argparse.Namespace) -> int:
    from clients.fleet import SimulationConfig, parse_speed_dist, simulate

    _quiet_library_warnings()
    settings, edge = PFISettings(), EdgeSettings()
    options = _options(args, edge)
    cfg = SimulationConfig(
        federation=args.federation,
        data=args.data,
        clients=args.clients,
        duration_s=args.duration,
        updates=args.updates,
        speed_sigma=parse_speed_dist(args.speed_dist),
        dropout=args.dropout,
        offline_s=args.offline,
        network_delay_s=args.network_delay,
        base_model=args.base_model,
        train=_train_cfg(args, edge, args.seed if args.seed is not None else 0),
        options=options,
        seed=args.seed if args.seed is not None else 0,
        max_active=args.max_active,
        state_dir=args.state_dir,
        progress=not args.no_progress,
        flush_timeout_s=args.flush_timeout if args.flush_timeout is not None else edge.flush_timeout_s,
        min_chars=args.min_chars,
    )

    async def run() -> dict[str, Any]:
        from redis.exceptions import RedisError

        try:
            return (await simulate(cfg, settings, edge)).to_dict()
        except RedisError as err:
            raise _redis_error(settings, err) from None

    summary = asyncio.run(run())
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['clients']} clients ({summary['users']} users): {summary['published']} published, "
            f"{summary['failed']} failed, {summary['queued']} queued, {summary['dropped']} dropouts in "
            f"{summary['duration_s']:.1f}s ({summary['updates_per_s']:.2f} updates/s); global "
            f"v{summary['start_version']} -> v{summary['end_version']}; peak RSS "
            f"{summary['peak_rss_bytes'] / 2**20:.0f} MiB"
        )
        for error in summary["errors"]:
            print(f"  error: {error}", file=sys.stderr)
    return 0 if summary["published"] > 0 or summary["failed"] == 0 else 1


# -------------------------------------------------------------------------------------------- flush


def _flush_command(args: argparse.Namespace) -> int:
    from clients.agent import KafkaSender, OutboxPublisher
    from clients.outbox import Outbox

    settings, edge = PFISettings(), EdgeSettings()
    directory = _state_dir(args, edge, settings) / args.user / "outbox"
    if not directory.is_dir():
        raise ConfigError(f"no outbox for user {args.user!r} at {directory}")

    async def run() -> tuple[int, int, str | None]:
        sender = KafkaSender(settings, request_timeout_ms=edge.request_timeout_ms)
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
        return result.sent, result.remaining, result.error

    sent, remaining, error = asyncio.run(run())
    print(f"sent {sent} update(s); {remaining} still queued" + (f" ({error})" if remaining else ""))
    return 0 if remaining == 0 else 1
