"""In-process wake-ups between the round driver and the gRPC handlers.

Two directions, kept apart so neither wakes the other's waiters for nothing:
new tasks wake long polls (and only a changed task epoch makes a poll query the
database again), accepted uploads wake the round driver. A coordinator that
restarts loses nothing: polls query once on arrival, the driver ticks anyway.

A waiting poll sleeps on an event of its own, set when tasks are created or when
its call ends (the client went away): no waiter wakes on a timer to look, which
at 2,000 waiting polls was 2,000 wake-ups a second competing for the
interpreter with the thread that accepts new calls.

The driver is woken only by the upload that can close a round: the one that
brings a job's accepted uploads up to the number it still awaits. Profile reports
count the same way while a job profiles, so the report that brings the last profile
in starts the assignment at once instead of at the next tick. Waking on
every upload made each of N uploads re-read the round's N task rows, O(N^2)
rows per round (90,000 at 300 workers); the other uploads are seen at the
driver's next regular tick.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fedpilot.coordinator.aio import wait_event


@dataclass(frozen=True)
class UploadMark:
    """Accepted uploads per job, and pokes, at one moment (see :meth:`Signals.upload_mark`)."""

    pokes: int = 0
    counts: Mapping[str, int] = field(default_factory=dict)


class Signals:
    def __init__(self) -> None:
        self._tasks = threading.Lock()
        self._epoch = 0
        self._waiters: set[_LoopEvent] = set()
        self.woken = 0
        """How many waiting polls the latest new tasks woke together (the wave's size)."""
        self._uploads = threading.Condition()
        self._accepted: Counter[str] = Counter()
        self._pokes = 0

    @property
    def task_epoch(self) -> int:
        return self._epoch

    def tasks_created(self) -> None:
        with self._tasks:
            self._epoch += 1
            waiters, self._waiters = self._waiters, set()
            self.woken = len(waiters)
        for wake in waiters:
            wake.set()

    async def tasks_after(self, seen_epoch: int, timeout: float, wake: asyncio.Event) -> int:
        """Wait, holding no thread, until tasks are created after ``seen_epoch``, ``wake``
        is set by someone else (the call ended), or ``timeout``; the epoch. The driver's
        thread sets ``wake`` through its loop; a caller that reuses it clears it before
        each wait."""
        loop = asyncio.get_running_loop()
        waiter = _LoopEvent(loop, wake)
        with self._tasks:
            if self._epoch != seen_epoch:
                return self._epoch
            self._waiters.add(waiter)
        try:
            await wait_event(wake, timeout)
        finally:
            with self._tasks:
                self._waiters.discard(waiter)
        return self._epoch

    def upload_accepted(self, job_id: str | None = None) -> None:
        """An upload (or a profile report) of ``job_id`` was accepted; without a job, wake
        the driver regardless (a poke: to stop it, or in tests)."""
        with self._uploads:
            if job_id is None:
                self._pokes += 1
            else:
                self._accepted[job_id] += 1
            self._uploads.notify_all()

    def upload_mark(self) -> UploadMark:
        """What has been accepted so far; the driver takes one before it reads task rows."""
        with self._uploads:
            return UploadMark(self._pokes, dict(self._accepted))

    def retain(self, job_ids: Iterable[str]) -> None:
        """Forget the counts of every job not in ``job_ids`` (finished jobs), so the
        counts stay as many as the active jobs."""
        keep = set(job_ids)
        with self._uploads:
            for job in [j for j in self._accepted if j not in keep]:
                del self._accepted[job]

    def wait_for_uploads(
        self, since: UploadMark, awaited: Mapping[str, int], timeout: float
    ) -> bool:
        """Block until, for some job, the uploads accepted after ``since`` reach
        ``awaited[job]`` (one upload where the job is not in ``awaited``), or a poke, or
        ``timeout``; whether uploads or a poke woke it."""

        def ready() -> bool:
            if self._pokes != since.pokes:
                return True
            for job, count in self._accepted.items():
                new = count - since.counts.get(job, 0)
                if new > 0 and new >= awaited.get(job, 1):
                    return True
            return False

        with self._uploads:
            return self._uploads.wait_for(ready, timeout)


class _LoopEvent:
    """An asyncio event that another thread sets (through its loop, the only safe way)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self.loop, self.event = loop, event

    def set(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.event.set)
