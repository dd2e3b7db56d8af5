"""The heartbeat interval the coordinator hands its workers, and its liveness timeout.

Every worker heartbeats once per interval, so a fixed interval makes the
coordinator's heartbeat load grow with the fleet: 2,000 workers at 2 s are
1,000 RPCs a second on thread-per-RPC handlers, which on the measured machine
left no time for the round itself (``docs/benchmarks.md``, "Load"). The
coordinator instead aims at a fleet-wide rate (``heartbeats_per_s``): the
interval is the configured one until the fleet outgrows that rate, then grows
with the number of workers alive. The liveness timeout keeps its ratio to the
interval (15 s for 2 s by default, seven beats), so a worker is declared dead
after the same number of missed beats at any fleet size.

Workers learn the interval from every Register and Heartbeat answer. When the
interval shrinks (the fleet got smaller), workers still on the longer one hear
of it only at their next beat, so the longer timeout is kept for one more
timeout period before the shorter one applies: nobody is declared dead for
following the last instruction they were given.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedpilot.coordinator.settings import CoordinatorSettings

MAX_INTERVAL_S = 60.0
"""However large the fleet, a worker beats at least once a minute."""


@dataclass(frozen=True)
class Cadence:
    interval_s: float
    timeout_s: float

    @property
    def interval_ms(self) -> int:
        return round(self.interval_s * 1000)


def cadence_for(
    alive: int, base_interval_s: float, base_timeout_s: float, heartbeats_per_s: float
) -> Cadence:
    """The interval for ``alive`` workers at ``heartbeats_per_s``, and its timeout.

    >>> cadence_for(100, 2.0, 15.0, 100.0)
    Cadence(interval_s=2.0, timeout_s=15.0)
    >>> cadence_for(2000, 2.0, 15.0, 100.0)
    Cadence(interval_s=20.0, timeout_s=150.0)
    """
    interval = max(base_interval_s, min(MAX_INTERVAL_S, alive / heartbeats_per_s))
    return Cadence(interval, base_timeout_s * interval / base_interval_s)


class HeartbeatCadence:
    """The current :class:`Cadence`, updated by the round driver from the alive count.

    Read by the gRPC handlers (the interval they answer with), the driver and
    the HTTP API (who counts as alive); thread-safe.
    """

    def __init__(
        self,
        base_interval_s: float,
        base_timeout_s: float,
        heartbeats_per_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = (base_interval_s, base_timeout_s, heartbeats_per_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._current = Cadence(base_interval_s, base_timeout_s)
        self._held_timeout = (base_timeout_s, clock())
        """A longer timeout still owed to workers told a longer interval, and until when."""

    @classmethod
    def from_settings(cls, settings: CoordinatorSettings) -> HeartbeatCadence:
        return cls(
            settings.heartbeat_interval_ms / 1000,
            settings.heartbeat_timeout_s,
            settings.heartbeats_per_s,
        )

    @property
    def interval_ms(self) -> int:
        """What Register and Heartbeat answer with."""
        with self._lock:
            return self._current.interval_ms

    @property
    def timeout_s(self) -> float:
        """Silence after which a worker no longer counts as alive."""
        with self._lock:
            held, until = self._held_timeout
            if self._clock() < until:
                return max(held, self._current.timeout_s)
            return self._current.timeout_s

    def observe(self, alive: int) -> Cadence:
        """Set the cadence for ``alive`` workers; the new one."""
        new = cadence_for(alive, *self._base)
        with self._lock:
            old = self._current
            if new.timeout_s < old.timeout_s:
                # Workers told the old interval keep the old timeout until they heard the new one.
                now = self._clock()
                held, until = self._held_timeout
                owed = max(held if now < until else 0.0, old.timeout_s)
                self._held_timeout = (owed, max(until, now + old.timeout_s))
            self._current = new
            return new


def wave_delay(woken: int, per_s: float, rng: random.Random | None = None) -> float:
    """How long one of ``woken`` long polls, woken together by new tasks, waits before it
    answers: uniform over ``woken / per_s`` seconds, so together they answer about
    ``per_s`` a second. Answered at once, 2,000 polls were followed by 2,000 downloads
    (or profile reports) in the same second, more than gRPC queues before it sheds calls;
    spread, a round at 2,000 workers took half the time and half the CPU
    (docs/benchmarks.md, "Load"). 0 when ``per_s`` is 0 or only one poll was woken."""
    if per_s <= 0 or woken <= 1:
        return 0.0
    return (rng or random).uniform(0.0, woken / per_s)
