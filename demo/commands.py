"""``pfi demo``: see :mod:`demo.runner` for the phases and the README for the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from demo.config import DEFAULT_DATA, DEFAULT_MODEL


def _run(args: argparse.Namespace) -> int:
    from demo.config import DemoConfig
    from demo.runner import command_line, run_demo

    cfg = DemoConfig.preset(
        args.quick,
        data=args.data,
        base_model=args.base_model,
        users=args.users,
        out=args.out,
        keep_stack=args.keep_stack,
        seed=args.seed,
        rounds=args.rounds,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        personal_lr=args.personal_lr,
        rank=args.rank,
        async_buffer=args.buffer_size,
        speed_sigma=args.speed_sigma,
        eval_chunks=args.eval_chunks,
        split=args.split,
        personal_steps=args.personal_steps,
        personal_step_lr=args.personal_step_lr,
        rag_k=args.rag_k,
        rag_context_tokens=args.rag_context_tokens,
    )
    run_demo(cfg, command=command_line(sys.argv[2:] if sys.argv[1:2] == ["demo"] else []))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: a personalized federation on SmolLM2, evaluated through the service",
        description="Start the local stack, the aggregator and the personalization service; run a fleet "
        "of edge agents (one per user) as async FedBuff and as sync FedAvg on a virtual clock; train a "
        "local-only baseline; let each device fit and gate its personal adapter; score base / local-only / "
        "global-only / personalized (ungated, gated) / global+RAG / personalized+RAG through the service; "
        "write report.md, report.json and PNG plots. Full run <= 30 min, --quick <= 10 min on 2 cores.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"a directory of <user>.txt, a JSONL or a play (default {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--base-model", default=None, help=f"default {DEFAULT_MODEL}; pfi/tiny-llama for tests"
    )
    parser.add_argument(
        "--users", type=int, default=None, help="the N users with the most text (24; quick 6)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="report directory (default reports/demo-<time>)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="6 users, the same recipe: <= 10 min on 2 CPU cores"
    )
    parser.add_argument("--keep-stack", action="store_true", help="leave Kafka, Redis and the topics running")
    parser.add_argument("--seed", type=int, default=None, help="speeds, delays, LoRA init and batches (0)")
    tuning = parser.add_argument_group("tuning (defaults from the preset)")
    tuning.add_argument("--rounds", type=int, default=None, help="updates per user in each run (3)")
    tuning.add_argument("--steps", type=int, default=None, help="local steps per update (3)")
    tuning.add_argument("--batch-size", type=int, default=None, help="sequences per step (4)")
    tuning.add_argument("--seq-len", type=int, default=None, help="tokens per training sequence (64)")
    tuning.add_argument("--lr", type=float, default=None, help="shared adapter learning rate")
    tuning.add_argument("--personal-lr", type=float, default=None, help="personal adapter learning rate")
    tuning.add_argument("--rank", type=int, default=None, help="LoRA rank (8)")
    tuning.add_argument("--buffer-size", type=int, default=None, help="K of the async FedBuff federation (4)")
    tuning.add_argument(
        "--speed-sigma", type=float, default=None, help="device speeds ~ lognormal(0, s) (0.8)"
    )
    tuning.add_argument("--eval-chunks", type=int, default=None, help="held-out chunks per user (3)")
    tuning.add_argument(
        "--split",
        choices=["tail", "random"],
        default=None,
        help="held-out part of each user: the last paragraphs (tail: time-like, default) or random ones",
    )
    tuning.add_argument(
        "--personal-steps", type=int, default=None, help="steps of the on-device personalization step"
    )
    tuning.add_argument(
        "--personal-step-lr", type=float, default=None, help="learning rate of the personalization step"
    )
    tuning.add_argument("--rag-k", type=int, default=None, help="chunks retrieved per scored chunk (4)")
    tuning.add_argument(
        "--rag-context-tokens", type=int, default=None, help="tokens of retrieved context, at most"
    )
    parser.set_defaults(func=_run)
