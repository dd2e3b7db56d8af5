"""Blocking work of the gRPC handlers runs on threads, and to its end once submitted."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.aio import run_blocking


def test_a_job_whose_caller_is_cancelled_while_it_waits_for_a_thread_still_runs() -> None:
    """A cleanup submitted just before the call is cancelled (its client went away) must
    not be skipped: an executor's future cancelled before it started never runs."""
    pool = ThreadPoolExecutor(1)
    release, ran = threading.Event(), threading.Event()
    pool.submit(release.wait, 10)  # the only thread is busy: the next job queues

    async def scenario() -> None:
        caller = asyncio.ensure_future(run_blocking(pool, ran.set))
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        release.set()

    asyncio.run(scenario())
    assert ran.wait(10), "the queued job was skipped when its caller was cancelled"
    pool.shutdown()


def test_a_job_runs_off_the_loop_and_its_error_reaches_the_caller() -> None:
    pool = ThreadPoolExecutor(2)

    async def scenario() -> tuple[str, str]:
        loop_thread = threading.current_thread().name
        job_thread = await run_blocking(pool, lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await run_blocking(pool, lambda: 1 / 0)
        return loop_thread, job_thread

    loop_thread, job_thread = asyncio.run(scenario())
    assert job_thread != loop_thread
    pool.shutdown()
