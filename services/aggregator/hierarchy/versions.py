"""The root's version commit: an accumulation of partials -> one global version, atomically with the
partials topic's offsets (the single aggregator's commit script, :meth:`VersionStore.commit_version`).

Offsets stored per federation, per partition ``p`` of the partials topic (in its ``offsets`` hash):

* ``<partials>:<p>`` (**own**): every partial of this federation below it is in a version (or refused):
  on replay the root skips them;
* ``<partials>:<p>:wm`` (**safe**): when written, every partial of *every* federation below it was in a
  version. Durability only grows, so the largest such value over the federations is where the root seeks.

The commit also adds every update's ``client/update id`` to ``seen`` (leaves refuse them from then on) and
fails with ``DUPLICATE`` if one is there already, so no update can enter two versions.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping

import torch

from modeling.lora import StateDict
from schemas.events import AggregationSpec
from schemas.records import UpdateContribution
from services.aggregator.hierarchy.partial import Accumulation, aggregate_partials
from services.aggregator.math.fedbuff import AggregationResult
from services.aggregator.math.server_optimizer import ServerOptState
from services.aggregator.math.strategies.gaussian_dp import account
from services.aggregator.publisher import Publisher
from services.aggregator.runtime import FederationRuntime
from services.aggregator.versioning import EncodedVersion, encode_version, version_records
from services.store.keys import seen_member
from services.store.versions import VersionCommit


def own_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def safe_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}:wm"


def fold_and_encode(
    global_state: StateDict,
    acc: Accumulation,
    spec: AggregationSpec,
    lineage: Mapping[int, int],
    opt_state: ServerOptState,
) -> tuple[AggregationResult, EncodedVersion]:
    """The version and its bytes (worker thread)."""
    generator = torch.Generator().manual_seed(secrets.randbits(62))
    result = aggregate_partials(global_state, acc, spec, lineage, opt_state, generator=generator)
    return result, encode_version(result)


def build_commit(
    runtime: FederationRuntime,
    acc: Accumulation,
    result: AggregationResult,
    encoded: EncodedVersion,
    offsets: Mapping[str, int],
    publisher: Publisher,
    stats: Mapping[str, int],
    started: float,
) -> tuple[VersionCommit, object, object]:
    """(commit, new accountant, announcement envelope)."""
    agg = runtime.spec.aggregation
    accountant, epsilon = account(runtime.accountant, agg)
    version = runtime.head + 1
    lineage = runtime.lineage
    updates = tuple(
        UpdateContribution(
            update_id=c.update_id,
            client_id=c.client_id,
            base_version=c.base_version,
            staleness=lineage[c.base_version],
            staleness_weight=result.staleness_weights[c.update_id],
            weight=result.weights[c.update_id],
            num_samples=c.num_samples,
            norm=c.norm,
            clipped=c.clipped,
        )
        for c in acc.contributions
    )
    meta, event = version_records(runtime, version, encoded, updates, result.noise_std, epsilon, started)
    envelope = publisher.version_envelope(event)
    counts = dict(stats)
    counts["accepted_total"] = counts.get("accepted_total", 0) + acc.count
    counts["aggregated_total"] = counts.get("aggregated_total", 0) + acc.count
    counts["partials_total"] = counts.get("partials_total", 0) + len(acc.partial_ids)
    commit = VersionCommit(
        federation=runtime.name,
        expected_latest=runtime.latest,
        expected_head=runtime.head,
        version=version,
        blob=encoded.blob,
        meta=meta,
        offsets=dict(offsets),
        seen_members=tuple(seen_member(c.client_id, c.update_id) for c in acc.contributions),
        seen_bases=tuple(c.base_version for c in acc.contributions),
        max_staleness=agg.max_staleness,
        stat_increments=counts,
        optimizer_blob=encoded.opt_blob,
        accountant_json=json.dumps(accountant.to_dict()) if epsilon is not None else "",
        keep_versions=agg.keep_versions,
        event_json=envelope.model_dump_json(),
    )
    return commit, accountant, envelope
