"""A call an overloaded coordinator sheds is sent again by the worker's channel.

gRPC's core refuses calls with CANCELLED, before any handler runs, once more than
about a thousand wait to be taken up (seen at 2,000 workers). That cannot be provoked
deterministically in a test, so the server here refuses the first attempts itself the
same way (CANCELLED, nothing sent before it) over real gRPC; the client side under test
is the real :class:`CoordinatorClient`, and the coordinator's own test of a resent call
runs on the real server context.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import pytest

from fedpilot.coordinator.guard import is_resent
from fedpilot.v1 import coordinator_pb2, coordinator_pb2_grpc
from fedpilot.worker.client import SHED_RETRY_ATTEMPTS, CoordinatorClient


class _Shedding(coordinator_pb2_grpc.CoordinatorServicer):
    """Refuses the first ``shed`` attempts of every call with CANCELLED, then answers."""

    def __init__(self, shed: int, code: grpc.StatusCode = grpc.StatusCode.CANCELLED) -> None:
        self.shed, self.code = shed, code
        self.attempts: list[str] = []
        self.lock = threading.Lock()

    def Heartbeat(self, request, context):
        previous = dict(context.invocation_metadata()).get("grpc-previous-rpc-attempts", "0")
        with self.lock:
            self.attempts.append(previous)
            refuse = len(self.attempts) <= self.shed
        if refuse:
            context.abort(self.code, "shed")
        return coordinator_pb2.HeartbeatResponse(heartbeat_interval_ms=1234)


@pytest.fixture()
def shedding(serve) -> Callable[[_Shedding], CoordinatorClient]:
    """A client of a stand-in that sheds, with room for every attempt's wait (up to 30 s)."""

    def start(servicer: _Shedding) -> CoordinatorClient:
        client = serve(servicer, timeout_s=60)
        client.authenticate("w", "t")
        return client

    return start


def test_a_shed_call_is_sent_again_and_answered(shedding) -> None:
    servicer = _Shedding(shed=2)
    client = shedding(servicer)
    assert client.heartbeat().heartbeat_interval_ms == 1234
    assert servicer.attempts == ["0", "1", "2"]


def test_a_call_shed_at_every_attempt_fails_after_the_last(shedding) -> None:
    servicer = _Shedding(shed=100)
    client = shedding(servicer)
    with pytest.raises(grpc.RpcError) as e:
        client.heartbeat()
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert len(servicer.attempts) == SHED_RETRY_ATTEMPTS


def test_other_refusals_are_not_resent(shedding) -> None:
    """A refusal with a reason (a rate limit, a bad token) is the caller's to handle."""
    servicer = _Shedding(shed=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    client = shedding(servicer)
    with pytest.raises(grpc.RpcError) as e:
        client.heartbeat()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.attempts == ["0"]


def test_the_coordinator_tells_a_resent_call(shedding) -> None:
    """``is_resent`` (which ``fedpilot_resent_calls_total`` counts by) reads what the
    client's channel sets on its second attempt, and only then."""
    seen: list[bool] = []

    class _Seeing(_Shedding):
        def Heartbeat(self, request, context):
            seen.append(is_resent(context))
            return super().Heartbeat(request, context)

    client = shedding(_Seeing(shed=1))
    assert client.heartbeat().heartbeat_interval_ms == 1234
    assert seen == [False, True]


class _EarlierCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A coordinator from before ``poll_keeps_alive``: its polls wait, and it never says
    an open poll keeps a worker alive (the field reads false)."""

    def __init__(self) -> None:
        self.polling = threading.Event()

    def Register(self, request, context):
        return coordinator_pb2.RegisterResponse(worker_id="w", token="t")

    def PollTask(self, request, context):
        self.polling.set()
        context.add_callback(self.polling.clear)
        time.sleep(request.wait_ms / 1000)
        return coordinator_pb2.PollTaskResponse(heartbeat_interval_ms=4321)


def test_a_worker_keeps_beating_while_it_polls_a_coordinator_that_does_not_count_polls(
    serve,
) -> None:
    servicer = _EarlierCoordinator()
    client = serve(servicer)
    client.register("w")
    assert not client.poll_keeps_alive
    future = client.poll_task_future(3_000)
    assert servicer.polling.wait(5)
    assert client.heartbeat_needed  # such a coordinator would count the worker dead
    client.poll_keeps_alive = True  # what a current coordinator's answer sets
    assert not client.heartbeat_needed
    future.cancel()
    deadline = time.monotonic() + 5
    while not client.heartbeat_needed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.heartbeat_needed


def test_a_poll_answer_tells_the_interval_and_a_cancelled_one_leaves_it(serve) -> None:
    """A worker that sends no heartbeats while it polls hears the interval from the poll's
    answer, through either way of polling; a poll cut short tells nothing."""
    client = serve(_EarlierCoordinator())
    client.register("w")
    assert client.heartbeat_interval_ms == 0  # that Register told none
    cancelled = client.poll_task_future(3_000)
    cancelled.cancel()
    assert client.heartbeat_interval_ms == 0 and client.heartbeat_needed
    assert client.poll_task(10) is None
    assert client.heartbeat_interval_ms == 4321
    client.heartbeat_interval_ms = 0
    assert client.poll_task_future(10).result().heartbeat_interval_ms == 4321
    deadline = time.monotonic() + 5
    while client.heartbeat_interval_ms != 4321 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.heartbeat_interval_ms == 4321
