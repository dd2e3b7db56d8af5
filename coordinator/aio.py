"""What the gRPC handlers' coroutines share: blocking work handed to threads, and waits
on an event with a timeout."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")


async def run_blocking(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``executor``'s threads: what would stall the event loop (a query, a
    file read, an fsync) never runs on it.

    Once submitted it runs to its end even if the awaiting call is cancelled meanwhile
    (the client went away): cancelling an executor's future that has not started skips
    it, and with it a write's cleanup, such as discarding a staged upload."""
    job = asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))
    job.add_done_callback(_retrieved)
    return await asyncio.shield(job)


def _retrieved(job: asyncio.Future[Any]) -> None:
    """Marks a job's outcome seen: one whose caller left is not an unhandled error."""
    if not job.cancelled():
        job.exception()


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Until ``event`` is set or ``timeout`` passes (a timer, not a task per wait)."""
    timer = asyncio.get_running_loop().call_later(timeout, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()
