"""``pfi clients enroll-token | add | list | revoke``: a federation's devices (the operator's side)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from schemas.errors import ConfigError
from services.settings import PFISettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")


def _with_redis(fn: Callable[[Redis], Awaitable[T]]) -> T:
    from redis.asyncio import Redis

    async def run() -> T:
        redis = Redis.from_url(PFISettings().redis())
        try:
            return await fn(redis)
        finally:
            await redis.aclose()

    return asyncio.run(run())


async def _require_federation(redis: Redis, fed: str) -> None:
    from services.store.versions import VersionStore

    if await VersionStore(redis).get_spec(fed) is None:
        raise ConfigError(f"no federation {fed!r}")


def _when(unix: float | None) -> str:
    return "-" if unix is None else datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _enroll_token(args: argparse.Namespace) -> int:
    from services.identity.enrollment import Enrollment
    from services.personalization.commands import parse_ttl

    async def run(redis: Redis) -> str:
        await _require_federation(redis, args.federation)
        issued = await Enrollment(redis).issue(args.federation, uses=args.uses, ttl_s=parse_ttl(args.ttl))
        return issued.token

    print(_with_redis(run))
    return 0


def _add(args: argparse.Namespace) -> int:
    from services.identity.registry import ClientRegistry

    try:
        key = bytes.fromhex(args.key) if args.key else None
    except ValueError:
        raise ConfigError("--key must be hex") from None

    async def run(redis: Redis) -> bytes:
        await _require_federation(redis, args.federation)
        return await ClientRegistry(redis).register(args.federation, args.client, key)

    print(_with_redis(run).hex())
    return 0


def _list(args: argparse.Namespace) -> int:
    from services.identity.registry import ClientRecord, ClientRegistry

    async def run(redis: Redis) -> list[ClientRecord]:
        return await ClientRegistry(redis).list(args.federation)

    records = _with_redis(run)
    if args.json:
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    for r in records:
        revoked = f"  revoked {_when(r.revoked_at)}" if r.revoked_at is not None else ""
        print(f"{r.client_id:32} {r.status:8} enrolled {_when(r.enrolled_at)} via {r.via}{revoked}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from services.identity.registry import ClientRegistry

    async def run(redis: Redis) -> bool:
        registry = ClientRegistry(redis)
        if await registry.revoke(args.federation, args.client):
            return True
        if await registry.get(args.federation, args.client) is None:
            raise ConfigError(f"no client {args.client!r} in federation {args.federation!r}")
        return False

    changed = _with_redis(run)
    print(f"{args.federation}: client {args.client} {'revoked' if changed else 'was already revoked'}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    clients = subparsers.add_parser(
        "clients",
        help="a federation's devices: enrollment tokens, registration, revocation",
        description="Devices enroll through the personalization API with an enrollment token; a revoked "
        "client's key and device tokens are refused by the aggregators and the API within seconds.",
    )
    sub = clients.add_subparsers(dest="action", metavar="ACTION", required=True)
    enroll = sub.add_parser("enroll-token", help="issue an enrollment token (printed once)")
    enroll.add_argument("federation")
    enroll.add_argument("--uses", type=int, default=1, help="how many devices may enroll with it (default 1)")
    enroll.add_argument("--ttl", default="1h", help="lifetime: seconds or 15m/12h/7d (default 1h)")
    enroll.set_defaults(func=_enroll_token)
    add = sub.add_parser("add", help="register a client directly; prints its hex signing key")
    add.add_argument("federation")
    add.add_argument("client")
    add.add_argument("--key", help="hex key to register instead of a random one")
    add.set_defaults(func=_add)
    lst = sub.add_parser("list", help="list the federation's clients (never their keys)")
    lst.add_argument("federation")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="revoke a client: its key and device tokens stop working")
    revoke.add_argument("federation")
    revoke.add_argument("client")
    revoke.set_defaults(func=_revoke)
