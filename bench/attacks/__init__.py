"""``pfi bench attacks``: issue 12's attacks, each with its expected outcome, against real ``pfi aggregator``
and ``pfi serve`` processes on the local stack (Kafka with SASL/SCRAM + ACLs, Redis).

* :mod:`bench.attacks.rig`: the processes, federations, enrolled devices, raw Kafka and HTTP access;
* :mod:`bench.attacks.shared`: the result rows, forged chunks and the exactly-once audit of the honest
  updates;
* the attacks: :mod:`bench.attacks.access` (transport, identity), :mod:`bench.attacks.ingest`,
  :mod:`bench.attacks.aggregator` (chunks, weighting, poison, ids, broken federations) and
  :mod:`bench.attacks.serving` (malformed JSON, flood);
* :mod:`bench.attacks.command`: options, the table and the JSON result.
"""

from __future__ import annotations

from typing import Any


def register(subparsers: Any) -> None:
    """``pfi bench attacks`` (imports the rig only when registered)."""
    from bench.attacks.command import register as _register

    _register(subparsers)
