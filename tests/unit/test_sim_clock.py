"""The simulator's clocks and device model (:mod:`sim.clock`, :mod:`sim.devices`), without a stack."""

from __future__ import annotations

import asyncio

import pytest

from schemas.errors import ConfigError
from sim.clock import VirtualClock, WallClock
from sim.devices import Device, DeviceModel, parse_speed_dist, seeded_rng, speed_factor, train_seed


def test_virtual_clock_pops_events_in_time_order_ties_in_scheduling_order() -> None:
    clock: VirtualClock[str] = VirtualClock()
    for when, item in [(3.0, "c"), (1.0, "a"), (3.0, "d"), (2.0, "b")]:
        clock.at(when, item)
    out = []
    while len(clock):
        out.append(clock.next())
    assert out == [(1.0, "a"), (2.0, "b"), (3.0, "c"), (3.0, "d")]
    assert clock.now() == 3.0


async def test_virtual_sleep_waits_for_nothing_and_wall_sleep_stops_early() -> None:
    virtual: VirtualClock[int] = VirtualClock()
    await asyncio.wait_for(virtual.sleep(3600.0), 30)  # a guard against hanging, not a timing check
    assert virtual.now() == 3600.0
    stop = asyncio.Event()
    wall = WallClock(stop)
    asyncio.get_running_loop().call_later(0.05, stop.set)
    await asyncio.wait_for(wall.sleep(3600.0), 30)  # returns when stopped, long before the hour
    assert wall.now() > 0


def test_device_model_is_seeded_per_user_and_round() -> None:
    class Cfg:
        seed, speed_sigma, steps, step_seconds, network_s = 1, 0.8, 3, 1.0, 0.5

    model = DeviceModel.build(["ann", "bob"], Cfg())
    assert model.speeds["ann"] == seeded_rng("speed", 1, "ann").lognormvariate(0.0, 0.8)
    delay = seeded_rng("network", 1, "bob", 2).uniform(0.0, 0.5)
    assert model.duration("bob", 2) == model.speeds["bob"] * 3 * 1.0 + delay
    assert speed_factor(seeded_rng("x"), 0.0) == 1.0
    assert train_seed(0, 5) == 5


def test_wall_clock_device_draws_one_stream_per_client() -> None:
    device = Device.build(seed=3, index=7, sigma=0.5)
    rng = seeded_rng("fleet", 3, 7)
    assert device.speed == rng.lognormvariate(0.0, 0.5)
    assert device.network_delay(0.02) == rng.uniform(0.0, 0.02)
    assert device.slowdown(2.0) == 2.0 * max(0.0, device.speed - 1.0)
    assert Device.build(seed=3, index=7, sigma=0.0).speed == 1.0


def test_speed_distribution() -> None:
    assert parse_speed_dist("lognormal:0.7") == 0.7
    assert parse_speed_dist("constant") == 0.0
    with pytest.raises(ConfigError):
        parse_speed_dist("gaussian:1")
