"""The worker service's life outside a task: against a real coordinator (gRPC,
PostgreSQL, no job) it follows the heartbeat interval each answer tells it and a
shutdown cuts its waiting long poll short; a call the server cancelled is retried."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from fedpilot.coordinator.server import start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.worker.service import WorkerService, WorkerSettings


def test_the_worker_follows_the_told_interval_and_shutdown_ends_its_long_poll(
    tmp_path: Path, pg_schema_url: str
) -> None:
    coordinator = start(
        CoordinatorSettings(
            data_dir=tmp_path / "coordinator",
            database_url=pg_schema_url,
            grpc_port=0,
            tick_seconds=0.05,
            heartbeat_interval_ms=200,
            heartbeats_per_s=0.5,  # one worker already outgrows it: a 2 s interval
        )
    )

    def worker(name: str, **settings: int) -> tuple[WorkerService, threading.Thread]:
        service = WorkerService(
            WorkerSettings(
                coordinator=f"127.0.0.1:{coordinator.port}",
                name=name,
                data=tmp_path / "unused.csv",
                memory_budget=1 << 30,
                **settings,  # type: ignore[arg-type]
            )
        )
        runner = threading.Thread(target=service.run, daemon=True)
        runner.start()
        return service, runner

    try:
        # Polling, it sends no heartbeats: the interval reaches it in every answer,
        # here each second (Register may still have said the configured 200 ms).
        told, runner = worker("told", poll_wait_ms=1_000)
        deadline = time.monotonic() + 20
        while told.heartbeat_s != 2.0:
            assert time.monotonic() < deadline, (
                f"the worker kept {told.heartbeat_s} s, "
                f"the coordinator says {coordinator.driver.cadence.interval_ms} ms"
            )
            time.sleep(0.05)
        told.shutdown()
        runner.join(timeout=8)

        service, runner = worker("lifecycle")
        assert service.settings.poll_wait_ms >= 20_000
        deadline = time.monotonic() + 20
        while service._poll is None:  # the long poll (20 s) is waiting: no job
            assert time.monotonic() < deadline, "the worker never polled"
            time.sleep(0.01)
        service.shutdown()
        # Well inside the poll's own 20 s wait: the shutdown cancelled it.
        runner.join(timeout=8)
        assert not runner.is_alive(), "shutdown waited for the long poll to run out"
    finally:
        coordinator.stop()


class _Cancelled(grpc.RpcError):
    """What gRPC raises for a call the server side cancelled (not this worker)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "CANCELLED"


def test_a_call_cancelled_by_the_server_is_retried_not_fatal(tmp_path: Path) -> None:
    """At 2,000 workers gRPC cancelled long polls the loaded server had not taken up;
    a worker that exited on that would leave the fleet."""
    service = WorkerService(
        WorkerSettings(
            coordinator="127.0.0.1:1", name="w", data=tmp_path / "unused.csv", memory_budget=1
        )
    )
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise _Cancelled()
        return "answered"

    assert service.call(flaky) == "answered"
    assert len(attempts) == 3
    service.stop.set()
    attempts.clear()
    with pytest.raises(grpc.RpcError):  # once stopping, a cancelled call ends the loop
        service.call(flaky)
    assert len(attempts) == 1
    service.client.close()
