"""The heartbeat cadence: the interval grows with the fleet, the timeout with it, and a
shrinking fleet never times out a worker still on the interval it was last told."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from fedpilot.coordinator.cadence import MAX_INTERVAL_S, HeartbeatCadence, cadence_for, wave_delay
from fedpilot.coordinator.server import start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.worker.client import CoordinatorClient


def test_interval_is_the_configured_one_until_the_fleet_outgrows_the_rate() -> None:
    assert cadence_for(0, 2.0, 15.0, 100.0).interval_s == 2.0
    assert cadence_for(200, 2.0, 15.0, 100.0).interval_s == 2.0
    grown = cadence_for(2000, 2.0, 15.0, 100.0)
    assert grown.interval_s == 20.0 and grown.timeout_s == 150.0
    assert grown.interval_ms == 20_000
    # The fleet-wide rate stays at the target once the interval grows.
    for alive in (300, 1000, 5000):
        c = cadence_for(alive, 2.0, 15.0, 100.0)
        assert alive / c.interval_s == pytest.approx(100.0)
        assert c.timeout_s / c.interval_s == pytest.approx(7.5)


def test_interval_is_capped() -> None:
    capped = cadence_for(10**9, 2.0, 15.0, 100.0)
    assert capped.interval_s == MAX_INTERVAL_S and capped.timeout_s == 15.0 * MAX_INTERVAL_S / 2.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_shrinking_fleet_keeps_the_longer_timeout_for_one_timeout_period() -> None:
    clock = Clock()
    cadence = HeartbeatCadence(2.0, 15.0, 100.0, clock=clock)
    assert (cadence.interval_ms, cadence.timeout_s) == (2000, 15.0)
    cadence.observe(2000)  # grows at once
    assert (cadence.interval_ms, cadence.timeout_s) == (20_000, 150.0)
    clock.now += 500
    cadence.observe(100)  # the interval shrinks at once, the timeout only later
    assert cadence.interval_ms == 2000
    assert cadence.timeout_s == 150.0
    clock.now += 149
    cadence.observe(100)
    assert cadence.timeout_s == 150.0, "a worker told 20 s may not have heard 2 s yet"
    clock.now += 2
    assert cadence.timeout_s == 15.0


def test_shrinking_twice_keeps_the_longest_timeout_owed() -> None:
    clock = Clock()
    cadence = HeartbeatCadence(2.0, 15.0, 100.0, clock=clock)
    cadence.observe(4000)  # 40 s, timeout 300 s
    cadence.observe(1000)  # 10 s: 300 s still owed
    clock.now += 10
    cadence.observe(300)  # 3 s
    assert cadence.interval_ms == 3000 and cadence.timeout_s == 300.0
    clock.now += 291
    assert cadence.timeout_s == 22.5


def test_workers_are_told_the_grown_interval_over_grpc(tmp_path: Path, pg_schema_url: str) -> None:
    """Register and Heartbeat answer with the interval for the fleet the driver counted."""
    coordinator = start(
        CoordinatorSettings(
            data_dir=tmp_path,
            database_url=pg_schema_url,
            grpc_port=0,
            tick_seconds=0.05,
            heartbeat_interval_ms=1000,
            heartbeat_timeout_s=10,
            heartbeats_per_s=0.5,  # so three workers already outgrow it
        )
    )
    try:
        target = f"127.0.0.1:{coordinator.port}"
        clients = [CoordinatorClient(target, timeout_s=10) for _ in range(4)]
        first = clients[0].register("w0", budget_bytes=1 << 30)
        assert first.heartbeat_interval_ms == 1000  # one worker: the configured interval
        for i, c in enumerate(clients[1:3], start=1):
            c.register(f"w{i}", budget_bytes=1 << 30)
        deadline = time.monotonic() + 10
        while clients[0].heartbeat().heartbeat_interval_ms != 6000:  # 3 alive / 0.5 per s
            assert time.monotonic() < deadline, "the interval never grew with the fleet"
            time.sleep(0.05)
        assert coordinator.driver.cadence.timeout_s == pytest.approx(60.0)
        fourth = clients[3].register("w3", budget_bytes=1 << 30)
        assert fourth.heartbeat_interval_ms >= 6000
    finally:
        coordinator.stop()


def test_a_wave_spreads_woken_polls_over_woken_over_rate_seconds() -> None:
    rng = random.Random(0)
    delays = [wave_delay(2000, 400.0, rng) for _ in range(2000)]
    assert all(0.0 <= d <= 5.0 for d in delays)
    assert max(delays) > 4.5 and min(delays) < 0.5  # the whole window is used
    assert sum(delays) / len(delays) == pytest.approx(2.5, abs=0.2)


def test_no_wave_when_it_is_off_or_one_poll_was_woken() -> None:
    assert wave_delay(2000, 0.0) == 0.0
    assert wave_delay(1, 400.0) == 0.0
    assert wave_delay(0, 400.0) == 0.0
