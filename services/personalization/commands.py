"""``pfi serve`` (the personalization service) and ``pfi token issue | revoke`` (bearer tokens)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re

from schemas.errors import ConfigError
from services.settings import PFISettings, ServeSettings

log = logging.getLogger("pfi.serve")

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``3600``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    match = _TTL.match(text.strip())
    if match is None or int(match.group(1)) <= 0:
        raise ConfigError(f"bad --ttl {text!r}: use seconds or a number with s/m/h/d, e.g. 30d")
    return int(match.group(1)) * _UNITS[match.group(2)]


async def _serve(settings: PFISettings, serve: ServeSettings) -> None:
    import uvicorn

    from services.personalization.app import create_app
    from services.personalization.service import PersonalizationService

    service = PersonalizationService(settings, serve)
    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=serve.host,
        port=serve.port,
        log_level="info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
    )
    log.info("starting the personalization service on %s:%d (OpenAPI at /docs)", serve.host, serve.port)
    await uvicorn.Server(config).serve()  # uvicorn logs "Uvicorn running on http://host:port"


def _run_serve(args: argparse.Namespace) -> int:
    overrides = {
        k: v
        for k, v in {"port": args.port, "host": args.host, "federations": args.federations}.items()
        if v is not None
    }
    serve = ServeSettings(**overrides)
    asyncio.run(_serve(PFISettings(), serve))
    return 0


def _run_issue(args: argparse.Namespace) -> int:
    import json
    import sys

    from services.personalization.auth import Role, TokenSigner, load_secret

    signer = TokenSigner(load_secret(ServeSettings(), PFISettings()))
    role: Role = "admin" if args.admin else "device" if args.device else "user"
    issued = signer.mint(
        args.user,
        federation=args.federation,
        role=role,
        ttl_s=None if args.ttl is None else parse_ttl(args.ttl),
    )
    if args.json:
        print(json.dumps({"token": issued.token, "jti": issued.jti, "expires_at": issued.expires_at}))
    else:
        print(issued.token)
        print(f"jti {issued.jti} (expires at {issued.expires_at})", file=sys.stderr)
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from services.personalization.auth import TokenSigner, load_secret, revoke_token
    from services.personalization.errors import Unauthorized

    jti, expires_at = args.token, None
    if "." in args.token:  # a whole token: its jti and expiry (verified with the local secret)
        signer = TokenSigner(load_secret(ServeSettings(), PFISettings()))
        try:
            who = signer.verify(args.token, now=0)
        except Unauthorized as err:
            raise ConfigError(f"cannot read that token: {err.message}") from None
        jti, expires_at = who.jti, float(who.expires_at)

    async def run() -> None:
        redis = Redis.from_url(PFISettings().redis())
        try:
            await revoke_token(redis, jti, expires_at)
        finally:
            await redis.aclose()

    asyncio.run(run())
    print(f"revoked token {jti}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the personalization service (HTTP API)",
        description="Serve base + global adapter (merged, hot-swapped on announcements) + personal adapters "
        "over HTTP: generate, score, personal adapter upload/delete, global adapter download, "
        "/healthz, /readyz, /metrics. Settings: PFI_SERVE_* environment variables.",
    )
    serve.add_argument("--port", type=int, default=None, help="HTTP port (PFI_SERVE_PORT, default 8080)")
    serve.add_argument("--host", default=None, help="bind address (PFI_SERVE_HOST, default 127.0.0.1)")
    serve.add_argument(
        "--federations", default=None, help="load these at start: a,b or '*' (PFI_SERVE_FEDERATIONS)"
    )
    serve.set_defaults(func=_run_serve)

    token = subparsers.add_parser(
        "token",
        help="bearer tokens of the personalization service",
        description="Tokens are signed with PFI_SERVE_TOKEN_SECRET "
        "(or the development secret under PFI_HOME).",
    )
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    issue = token_sub.add_parser(
        "issue",
        help="mint a token of one federation: a user's, a device's or an admin's",
        description="Prints the token on stdout and its id (jti, for 'pfi token revoke') on stderr.",
    )
    issue.add_argument("user", help="the user id (a device: its client id) the token acts as")
    issue.add_argument("--federation", required=True, help="the one federation the token is valid in")
    kind = issue.add_mutually_exclusive_group()
    kind.add_argument("--admin", action="store_true", help="admin: any user of the federation, admin routes")
    kind.add_argument("--device", action="store_true", help="a device token (USER is the client id)")
    issue.add_argument("--ttl", default=None, help="lifetime: seconds or 15m/12h/7d (default 1h; admin 15m)")
    issue.add_argument("--json", action="store_true", help='print {"token", "jti", "expires_at"}')
    issue.set_defaults(func=_run_issue)
    revoke = token_sub.add_parser(
        "revoke", help="revoke a token (by jti, or the token itself) in every replica within seconds"
    )
    revoke.add_argument(
        "token", metavar="JTI", help="the token id printed by 'pfi token issue', or the token"
    )
    revoke.set_defaults(func=_run_revoke)
