"""The round driver's wake-ups: only the upload that can close a round wakes it early."""

from __future__ import annotations

import asyncio
import threading
import time

from coordinator.signals import Signals


def test_driver_wakes_on_the_upload_that_completes_the_awaited_count() -> None:
    signals = Signals()
    mark = signals.upload_mark()
    signals.upload_accepted("job-a")
    signals.upload_accepted("job-a")
    # Three awaited, two in: not yet (the wait runs out instead).
    assert signals.wait_for_uploads(mark, {"job-a": 3}, timeout=0.01) is False
    signals.upload_accepted("job-a")
    assert signals.wait_for_uploads(mark, {"job-a": 3}, timeout=0.01) is True


def test_uploads_of_other_jobs_count_apart_and_an_unknown_job_wakes_at_once() -> None:
    signals = Signals()
    mark = signals.upload_mark()
    for _ in range(5):
        signals.upload_accepted("job-b")
    assert signals.wait_for_uploads(mark, {"job-a": 1, "job-b": 6}, timeout=0.01) is False
    # A job the driver knows nothing of (not training at its last tick): any upload.
    signals.upload_accepted("job-c")
    assert signals.wait_for_uploads(mark, {"job-a": 1, "job-b": 6}, timeout=0.01) is True


def test_only_uploads_after_the_mark_count_and_a_poke_always_wakes() -> None:
    signals = Signals()
    signals.upload_accepted("job-a")
    mark = signals.upload_mark()
    assert signals.wait_for_uploads(mark, {"job-a": 1}, timeout=0.01) is False
    signals.upload_accepted()
    assert signals.wait_for_uploads(mark, {"job-a": 1}, timeout=0.01) is True


def test_retain_forgets_finished_jobs() -> None:
    signals = Signals()
    signals.upload_accepted("done-job")
    signals.upload_accepted("live-job")
    signals.retain(["live-job"])
    assert dict(signals.upload_mark().counts) == {"live-job": 1}


def test_a_waiting_poll_wakes_when_tasks_are_created_and_not_before() -> None:
    signals = Signals()
    seen = signals.task_epoch

    async def scenario() -> None:
        waiting = asyncio.ensure_future(signals.tasks_after(seen, 30.0, asyncio.Event()))
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the wait ended with no task and no timeout"
        signals.tasks_created()
        assert await asyncio.wait_for(waiting, 10) == seen + 1

    asyncio.run(scenario())


def test_an_epoch_already_moved_returns_at_once_and_the_callers_event_ends_a_wait() -> None:
    signals = Signals()
    seen = signals.task_epoch
    signals.tasks_created()

    async def scenario() -> None:
        assert await signals.tasks_after(seen, 30.0, asyncio.Event()) == seen + 1
        # The caller's own event (its call ended) ends the wait; the epoch is unchanged.
        wake = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, wake.set)
        assert await asyncio.wait_for(signals.tasks_after(seen + 1, 30.0, wake), 10) == seen + 1

    asyncio.run(scenario())
    assert not signals._waiters, "a finished wait stayed registered"


def test_woken_counts_the_polls_the_latest_tasks_woke_together() -> None:
    signals = Signals()
    seen = signals.task_epoch

    async def scenario() -> None:
        waits = [
            asyncio.ensure_future(signals.tasks_after(seen, 30.0, asyncio.Event()))
            for _ in range(3)
        ]
        deadline = time.monotonic() + 10
        while len(signals._waiters) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        signals.tasks_created()
        await asyncio.wait_for(asyncio.gather(*waits), 10)

    asyncio.run(scenario())
    assert signals.woken == 3
    signals.tasks_created()  # nobody waiting any more
    assert signals.woken == 0


def test_a_coroutine_poll_wakes_from_the_drivers_thread_by_its_end_or_its_timeout() -> None:
    """``tasks_after``: the event-loop form of the wait. New tasks created on another
    thread (the driver's) wake it through its loop; so does its caller's end; and
    nothing else before its timeout."""
    signals = Signals()

    async def scenario() -> tuple[int, float, float, int]:
        wake = asyncio.Event()
        waiting = asyncio.ensure_future(signals.tasks_after(0, 30, wake))
        await asyncio.sleep(0.05)
        assert not waiting.done() and len(signals._waiters) == 1
        threading.Thread(target=signals.tasks_created).start()
        epoch = await asyncio.wait_for(waiting, 5)
        assert signals._waiters == set()
        wake.clear()  # the caller ends: its own event wakes the next wait
        began = time.monotonic()
        ended = asyncio.ensure_future(signals.tasks_after(epoch, 30, wake))
        await asyncio.sleep(0.05)
        wake.set()
        await asyncio.wait_for(ended, 5)
        stopped = time.monotonic() - began
        wake.clear()
        began = time.monotonic()
        again = await signals.tasks_after(epoch, 0.2, wake)  # nothing: its timeout
        return epoch, stopped, time.monotonic() - began, again

    epoch, stopped, timed_out, again = asyncio.run(scenario())
    assert epoch == 1 and again == 1
    assert stopped < 5
    assert 0.15 <= timed_out < 5
