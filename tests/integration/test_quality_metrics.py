"""Issue 16, operator view of personalization quality, on the real stack (Kafka + Redis, tiny model):

- edge agents measure their held-out loss under the global alone and with their personal adapter, and
  the previous global's once the global moved; their updates go through the HTTPS ingest and Kafka to
  the aggregator, whose metrics then show exactly what the agents reported;
- what a client claims never costs an update: a malformed report is ignored (counted), an absurd claim
  is clamped, and a flood of claims from one client counts it once in the shares.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from clients.agent import RoundResult
from clients.data import UserData
from clients.quality import DEFAULT_SEQUENCES
from clients.training import AdapterTrainer, TrainConfig
from modeling.base import TINY_LLAMA, load_base_model
from schemas.events import MAX_REPORTED_LOSS, TrainingMetrics
from schemas.frame import MAGIC, encode_frame, split_raw
from services.aggregator.quality import DEFAULT_MARGIN
from services.aggregator.service import Aggregator
from services.federation.admin import create_federation
from services.ingest.producer import UpdateProducer
from services.personalization.harness import serving
from services.settings import PFISettings, ServeSettings
from services.store.versions import VersionStore
from tests.support.edge import Devices
from tests.support.federations import (
    global_state,
    new_client,
    new_federation,
    random_delta,
    read_events,
    running_aggregator,
    sample,
    shapes_of,
    tiny_spec,
    wait_for,
    wait_version,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

CFG = TrainConfig(steps=6, batch_size=4, seq_len=64, lr=1e-2, seed=1)
REPORTS = "pfi_aggregator_quality_reports_total"


def user_text(user_id: str, seed: int) -> UserData:
    rng = random.Random(seed)
    words = ["ZORP", "blik", "QUANDO", "fee", "mumble", "TAK", "wherefore", "art"]
    text = "\n\n".join(
        "\n".join(" ".join(rng.choice(words[: 4 + seed]) for _ in range(6)) + "!" for _ in range(3))
        for _ in range(30)
    )
    return UserData.from_text(user_id, text, heldout_fraction=0.2)


@pytest.fixture(scope="module")
def trainer() -> AdapterTrainer:
    return AdapterTrainer(load_base_model(TINY_LLAMA), tiny_spec())


def gauge(aggregator: Aggregator, name: str, federation: str) -> float | None:
    return aggregator.registry.get_sample_value(f"pfi_aggregator_{name}", {"federation": federation})


async def accepted(aggregator: Aggregator, federation: str, count: int) -> None:
    async def done() -> bool:
        return sample(aggregator, "pfi_aggregator_updates_accepted_total", federation=federation) >= count

    await wait_for(done, timeout=60)


async def test_agents_reports_reach_the_aggregators_metrics(
    pfi_settings: PFISettings, redis_client: Redis, trainer: AdapterTrainer, tmp_path: Path
) -> None:
    store = VersionStore(redis_client)
    spec = tiny_spec(buffer_size=3)
    await create_federation(store, spec)
    users = ["alice", "bob", "carol"]
    data = {user: user_text(user, seed) for seed, user in enumerate(users)}
    rounds: list[RoundResult] = []
    async with serving(pfi_settings, ServeSettings()) as h, running_aggregator(pfi_settings) as aggregator:
        devices = Devices(h, trainer, tmp_path)
        try:
            agents = [await devices.make(spec.name, user) for user in users]
            for agent in agents:  # round 1, all on v0: no previous global yet
                rounds.append(await agent.run_round(data[agent.user_id], CFG))
            await wait_version(store, spec.name, 1)
            for agent in agents:  # round 2 on v1: the previous global's loss is reported
                rounds.append(await agent.run_round(data[agent.user_id], CFG))
            await accepted(aggregator, spec.name, 6)
        finally:
            for identity in devices.identities:
                await identity.aclose()

        first, second = rounds[:3], rounds[3:]
        assert all(r.published for r in rounds)
        assert [r.base_version for r in rounds] == [0, 0, 0, 1, 1, 1]
        # What the agents measured is the held-out loss of the global they trained from, on a fixed sample.
        v0 = await global_state(store, spec.name, 0)
        for r in first:
            again = trainer.evaluate(
                {"shared": v0},
                [data[r.client_id].heldout_text],
                seq_len=CFG.seq_len,
                batch_size=CFG.batch_size,
                max_sequences=DEFAULT_SEQUENCES,
            )
            assert r.quality.val_loss_global == pytest.approx(again.mean_nll, rel=1e-5)
            assert r.quality.val_loss_personal is not None
            assert r.quality.val_loss_prev_global is None
        for before, after in zip(first, second, strict=True):
            assert after.quality.val_loss_prev_global == before.quality.val_loss_global
            assert after.quality.val_loss_global != before.quality.val_loss_global  # v1 is another model

        # The aggregator's metrics carry exactly that, per federation.
        assert sample(aggregator, REPORTS, federation=spec.name, outcome="used") == 6
        gain = "pfi_aggregator_personalization_gain_ratio_count"
        assert sample(aggregator, gain, federation=spec.name) == 6
        change = "pfi_aggregator_global_loss_change_ratio_count"
        assert sample(aggregator, change, federation=spec.name) == 3

        def relative(new: float | None, old: float | None) -> float:
            assert new is not None
            assert old is not None
            return (new - old) / old

        harmed = sum(
            relative(r.quality.val_loss_personal, r.quality.val_loss_global) > DEFAULT_MARGIN for r in second
        )
        worse = sum(
            relative(r.quality.val_loss_global, r.quality.val_loss_prev_global) > DEFAULT_MARGIN
            for r in second
        )
        assert gauge(aggregator, "personalization_reporting_clients", spec.name) == 3
        assert gauge(aggregator, "personalization_harmed_clients", spec.name) == harmed
        assert gauge(aggregator, "global_change_reporting_clients", spec.name) == 3
        assert gauge(aggregator, "global_regressed_clients", spec.name) == worse
        # Nothing names a client.
        text = "\n".join(f"{s.name} {s.labels}" for m in aggregator.registry.collect() for s in m.samples)
        assert not any(user in text for user in users)


async def test_claims_never_cost_an_update_and_a_flood_counts_once(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    store = VersionStore(redis_client)
    spec = await new_federation(store, buffer_size=4)
    shapes = shapes_of(await global_state(store, spec.name, 0))
    honest = [await new_client(redis_client, spec) for _ in range(3)]
    liar = await new_client(redis_client, spec)
    sloppy = await new_client(redis_client, spec)
    better = TrainingMetrics(val_loss_global=3.0, val_loss_personal=2.7, val_loss_prev_global=3.3)
    disaster = TrainingMetrics(
        val_loss_global=MAX_REPORTED_LOSS, val_loss_personal=MAX_REPORTED_LOSS, val_loss_prev_global=0.001
    )
    malformed = TrainingMetrics(val_loss_personal=2.0)  # relative to a global loss it does not give
    sent: list[tuple[Any, TrainingMetrics]] = [(c, better) for c in honest]
    sent += [(liar, disaster)] * 6 + [(sloppy, malformed)]
    async with running_aggregator(pfi_settings) as aggregator, UpdateProducer(pfi_settings) as producer:
        for seed, (client, metrics) in enumerate(sent):
            envelope = client.update(random_delta(shapes, seed), base_version=0, metrics=metrics)
            await producer.send(envelope, key=client.key)
        await wait_version(store, spec.name, 2)  # 8 of the 10 updates aggregated: none was refused
        await accepted(aggregator, spec.name, len(sent))

        rejected = [
            s
            for m in aggregator.registry.collect()
            for s in m.samples
            if s.name == "pfi_aggregator_updates_rejected_total" and s.labels.get("federation") == spec.name
        ]
        assert sum(s.value for s in rejected) == 0
        assert sample(aggregator, REPORTS, federation=spec.name, outcome="used") == 4
        assert sample(aggregator, REPORTS, federation=spec.name, outcome="repeat") == 5
        assert sample(aggregator, REPORTS, federation=spec.name, outcome="invalid") == 1
        # The liar counts once: 1 of 4 clients made worse, whatever it sent.
        assert gauge(aggregator, "global_change_reporting_clients", spec.name) == 4
        assert gauge(aggregator, "global_regressed_clients", spec.name) == 1
        assert gauge(aggregator, "personalization_harmed_clients", spec.name) == 0
        # Its +99 900 % claim is clamped to +100 %: in the last finite bucket, not beyond.
        bucket = "pfi_aggregator_global_loss_change_ratio_bucket"
        assert sample(aggregator, bucket, federation=spec.name, le="0.5") == 3
        assert sample(aggregator, bucket, federation=spec.name, le="1.0") == 4


BAD_REPORTS = ["NaN", "Infinity", "-Infinity", "1e999", "-1", "1000", '"low"', "[1]", "{}", "true"]


async def test_the_ingest_refuses_a_bad_report_with_a_typed_4xx(
    pfi_settings: PFISettings, redis_client: Redis
) -> None:
    """A report outside the contract (not a finite number in 0..100) is a schema error at the HTTPS
    ingest, before anything reaches Kafka: the device learns why (its SDK never sends such values)."""
    store = VersionStore(redis_client)
    spec = await new_federation(store, buffer_size=3)
    client = await new_client(redis_client, spec)
    shapes = shapes_of(await global_state(store, spec.name, 0))
    metrics = TrainingMetrics(val_loss_global=2.5, val_loss_personal=2.25)
    envelope = client.update(random_delta(shapes, 1), base_version=0, metrics=metrics)
    header, payload = split_raw(encode_frame(envelope), max_frame_bytes=1 << 24, max_header_bytes=1 << 20)
    url = f"/v1/federations/{spec.name}/updates"
    async with serving(pfi_settings, ServeSettings()) as h:
        token = h.service.signer.issue(client.client_id, federation=spec.name, role="device")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        for raw in BAD_REPORTS:
            text = json.dumps(header).replace('"val_loss_personal": 2.25', f'"val_loss_personal": {raw}')
            assert raw in text
            body = text.encode()
            frame = MAGIC + len(body).to_bytes(4, "big") + body + payload
            response = await h.client.post(url, content=frame, headers=headers)
            assert response.status_code == 400, (raw, response.text)
            error = response.json()["error"]
            assert error["code"] == "malformed", (raw, error)  # the ingest's code for a schema error
            assert "val_loss_personal" in error["message"], (raw, error)
        good = await h.client.post(url, content=encode_frame(envelope), headers=headers)
        assert good.status_code == 202, good.text
    events = await read_events(pfi_settings, pfi_settings.updates_topic, 2, timeout=5.0)
    assert [e.metrics for e in events] == [metrics]  # only the valid update was produced
