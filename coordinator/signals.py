"""In-process wake-ups between the round driver and the gRPC handlers.

Two directions, kept apart so neither wakes the other's waiters for nothing:
new tasks wake long polls (and only a changed task epoch makes a poll query the
database again), accepted uploads wake the round driver. A coordinator that
restarts loses nothing: polls query once on arrival, the driver ticks anyway.
"""

from __future__ import annotations

import threading


class Signals:
    def __init__(self) -> None:
        self._tasks = threading.Condition()
        self._epoch = 0
        self._uploads = threading.Condition()

    @property
    def task_epoch(self) -> int:
        return self._epoch

    def tasks_created(self) -> None:
        with self._tasks:
            self._epoch += 1
            self._tasks.notify_all()

    def wait_for_tasks(self, seen_epoch: int, timeout: float) -> int:
        """Block until tasks are created after ``seen_epoch`` or ``timeout``; the epoch."""
        with self._tasks:
            self._tasks.wait_for(lambda: self._epoch != seen_epoch, timeout)
            return self._epoch

    def upload_accepted(self) -> None:
        with self._uploads:
            self._uploads.notify_all()

    def wait_for_upload(self, timeout: float) -> None:
        with self._uploads:
            self._uploads.wait(timeout)
