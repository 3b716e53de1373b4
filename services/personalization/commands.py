"""``pfi serve`` (the personalization service) and ``pfi token issue`` (bearer tokens)."""

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
    from services.personalization.auth import TokenSigner, load_secret

    signer = TokenSigner(load_secret(ServeSettings(), PFISettings()))
    token = signer.issue(args.user, admin=args.admin, ttl_s=parse_ttl(args.ttl), federation=args.federation)
    print(token)
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
    issue = token_sub.add_parser("issue", help="mint a token bound to a user (or an admin token)")
    issue.add_argument("--user", required=True, help="the user id the token acts as")
    issue.add_argument("--admin", action="store_true", help="admin scope: any user, admin routes")
    issue.add_argument("--ttl", default="30d", help="lifetime: seconds or 15m/12h/30d (default 30d)")
    issue.add_argument("--federation", default=None, help="limit a user token to one federation")
    issue.set_defaults(func=_run_issue)
