"""``pfi bench attacks``: options, the run (phases in order), the table and ``bench/results/attacks.json``.

Ratios: ``attacks_tried``, ``attacks_not_refused`` (goal 0), ``versions_beyond_bound`` (0: versions in
which one attacker moved the global further from where the honest updates alone lead than
``influence_bound`` allows), ``legit_uploads_lost`` (0: honest uploads accepted by the ingest and not
aggregated exactly once), ``process_exits`` (0: ``pfi aggregator`` / ``pfi serve`` exits before the
benchmark stopped them), ``serve_rss_growth_mib`` under the flood of unauthenticated large bodies.
The command's exit status is 1 when any attack was not refused (or any of those zero counts is not 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.attacks import access, aggregator, ingest, serving, shared
from bench.attacks.rig import Rig, new_workdir
from bench.common import BenchError, ratio_lines, say, write_result

NAME = "attacks"
SUMMARY = "issue 12's attacks against real aggregator + serve processes: refused, bounded, nothing lost"
GOALS = {
    "attacks_not_refused": "<= 0",
    "versions_beyond_bound": "<= 0",
    "legit_uploads_lost": "<= 0",
    "process_exits": "<= 0",
}
QUICK = {"rounds": 3, "weight_rounds": 3, "fake_uploads": 5, "flood_bodies": 3, "flood_mib": 8}
FULL = {"rounds": 6, "weight_rounds": 10, "fake_uploads": 50, "flood_bodies": 20, "flood_mib": 64}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    rig = Rig(new_workdir(args.workdir))
    out = shared.Attacks()
    began = time.monotonic()
    weighting: dict[str, Any] = {}
    flood: dict[str, Any] = {}
    audit: dict[str, Any] = {}
    codes: dict[str, int | None] = {}
    try:
        say(f"attacks: starting pfi aggregator + pfi serve (logs in {rig.workdir})")
        await rig.start()
        say(f"  ready after {time.monotonic() - began:.1f}s; enrolling devices")
        main = rig.main
        honest = await rig.enroll_many(main, [f"honest-{i}" for i in range(args.honest)])
        attacker, hog, squatter, bomber, flooder, doomed = await rig.enroll_many(
            main, ["mallory", "hog", "squatter", "bomber", "flooder", "doomed"]
        )
        w_honest = await rig.enroll_many(rig.weights, [f"whonest-{i}" for i in range(3)])
        (w_attacker,) = await rig.enroll_many(rig.weights, ["winflator"])

        say("transport (Kafka SASL/ACLs)")
        await access.transport(rig, out)
        say("identity (tokens, scopes, revocation)")
        await access.identity(rig, out, honest, doomed)
        say("ingest route")
        await ingest.ingest(rig, out, honest[0], honest[1], hog)
        await serving.malformed_json(rig, out)
        say("honest traffic")
        for r in range(args.rounds):
            await rig.honest_round(honest, seed=r + 1)
        say("chunks (forged chunks, fake uploads)")
        await aggregator.forged_chunks(rig, out, honest[0], attacker)
        await aggregator.fake_uploads(rig, out, honest[1], args.fake_uploads, args.fake_upload_mib * 2**20)
        say("update ids, buffer filling, poison, broken federations")
        await aggregator.squat(rig, out, honest[2], squatter)
        await aggregator.buffer_fill(rig, out, flooder, honest, main.aggregation.buffer_size)
        await aggregator.huge_values(rig, out, bomber, honest)
        await aggregator.broken_federations(rig, out, attacker, honest)
        say(f"weight inflation ({args.weight_rounds} versions of 3 honest + 1 attacker)")
        weighting = await aggregator.weight_inflation(rig, out, w_honest, w_attacker, args.weight_rounds)
        say(f"flood: {args.flood_bodies} x {args.flood_mib} MiB unauthenticated bodies")
        flood = await serving.flood(rig, out, args.flood_bodies, args.flood_mib, args.flood_concurrency)
        say("final honest round and the exactly-once audit")
        await rig.honest_round(honest, seed=999)
        audit = await shared.audit(rig)
    finally:
        exits = dict(rig.poll_exits())
        codes = await rig.close()
    elapsed = time.monotonic() - began
    not_refused = [r.name for r in out.rows if not r.ok]
    ratios: dict[str, Any] = {
        "attacks_tried": len(out.rows),
        "attacks_not_refused": len(not_refused),
        "versions_beyond_bound": int(weighting.get("versions_beyond_bound", 0)),
        "legit_uploads_lost": sum(int(audit.get(k, 0)) for k in ("lost", "double_counted", "refused")),
        "process_exits": len(exits),
        "serve_rss_growth_mib": float(flood.get("rss_growth_mib", 0.0)),
        "serve_rss_peak_growth_mib": float(flood.get("rss_peak_growth_mib", 0.0)),
    }
    return {
        "benchmark": NAME,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "elapsed_s": elapsed,
        "attacks": out.as_dicts(),
        "not_refused": not_refused,
        "figures": out.figures,
        "weighting": weighting,
        "flood": flood,
        "audit": audit,
        "unexpected_exits": exits,
        "stop_exit_codes": codes,
        "logs": str(rig.workdir),
        "ratios": ratios,
        "goals": GOALS,
    }


def failed(result: dict[str, Any]) -> bool:
    r = result["ratios"]
    return any(
        r[k] != 0
        for k in ("attacks_not_refused", "versions_beyond_bound", "legit_uploads_lost", "process_exits")
    )


def table(result: dict[str, Any]) -> str:
    rows = result["attacks"]
    width = max((len(r["group"]) + len(r["name"]) + 1 for r in rows), default=20)
    lines = [
        f"attacks: {len(rows)} tried in {result['elapsed_s']:.0f}s against pfi aggregator + pfi serve",
        f"{'attack':<{width}}  {'ok':<3}  {'expected':<34}  observed",
    ]
    for r in rows:
        lines.append(
            f"{r['group'] + '/' + r['name']:<{width}}  {'ok' if r['ok'] else 'NO':<3}  "
            f"{r['expected']:<34}  {r['observed']}"
        )
    a, f = result.get("audit") or {}, result.get("flood") or {}
    if a:
        lines.append(
            f"audit: {a['honest_sent']} honest uploads, {a['aggregated']} aggregated, {a['lost']} lost, "
            f"{a['double_counted']} double counted; versions {a['versions']}"
        )
    if f:
        lines.append(
            f"flood: {f['bodies']} x {f['body_mib']} MiB -> {f['statuses']}, "
            f"slowest {f['slowest_answer_s']:.2f}s, serve RSS {f['rss_before_mib']:.0f} -> "
            f"{f['rss_after_mib']:.0f} MiB (peak {f['rss_peak_mib']:.0f})"
        )
    lines.append(
        f"process exits before stop: {result['unexpected_exits'] or 'none'}; "
        f"stop: {result['stop_exit_codes']}"
    )
    lines += ratio_lines(result["ratios"], GOALS)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes (the test suite's variant, ~2 min)")
    parser.add_argument("--honest", type=int, default=3, help="honest devices of the main federation (3)")
    parser.add_argument(
        "--rounds", type=int, default=None, help="honest rounds before the attacks (6; quick 3)"
    )
    parser.add_argument(
        "--weight-rounds", type=int, default=None, help="versions of the weighting attack (10; 3)"
    )
    parser.add_argument("--fake-uploads", type=int, default=None, help="fake chunked uploads (50; quick 5)")
    parser.add_argument("--fake-upload-mib", type=int, default=60, help="size each fake upload claims (60)")
    parser.add_argument("--flood-bodies", type=int, default=None, help="unauthenticated bodies (20; quick 3)")
    parser.add_argument("--flood-mib", type=int, default=None, help="MiB per flood body (64; quick 8)")
    parser.add_argument("--flood-concurrency", type=int, default=4, help="flood bodies in flight at once (4)")
    parser.add_argument("--workdir", default=None, help="service logs (default a temporary directory)")
    parser.add_argument("--out", default=None, help="the JSON result (default bench/results/attacks.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.honest < 3:
        raise BenchError("--honest must be >= 3 (the attacks use three honest devices)")
    if min(args.rounds, args.weight_rounds, args.fake_uploads, args.flood_bodies, args.flood_mib) < 1:
        raise BenchError("sizes must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(_run(resolve(args)))
    path = write_result(NAME, result, args.out)
    say(f"wrote {path}")
    return result


def register(subparsers: Any) -> None:
    def command(args: argparse.Namespace) -> int:
        result = run(args)
        print(json.dumps(result, indent=2, default=str) if args.json else table(result))
        return 1 if failed(result) else 0

    parser = subparsers.add_parser(NAME, help=SUMMARY)
    add_arguments(parser)
    parser.set_defaults(func=command)
