"""What every gRPC call of the Coordinator service passes through before and after its
handler: parse failures, authentication, per-worker concurrency, idle streams and
unexpected exceptions.

- Request bytes that are not a valid message become INVALID_ARGUMENT (MALFORMED),
  counted, instead of gRPC's own INTERNAL.
- Every method but Register needs a known worker's token in the call metadata,
  checked before the handler runs, so an upload stream is never read for a
  caller without one.
- One worker may have ``max_rpcs_per_worker`` calls in progress; beyond that it
  gets RESOURCE_EXHAUSTED, so one enrolled worker cannot hold every thread.
- Streams silent for ``stream_idle_timeout_s`` (an upload that sends nothing, a
  download nobody reads) are cancelled.
- An exception no handler expected becomes INTERNAL with an error id; the
  details (SQL text, paths) go to the log, never to the caller.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from typing import Any, NamedTuple

import grpc

from fedpilot.coordinator import metrics
from fedpilot.coordinator.aio import run_blocking
from fedpilot.coordinator.db.models import Worker
from fedpilot.coordinator.db.store import Store
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.v1 import errors_pb2
from fedpilot.wire import WireError, rich_status

log = logging.getLogger(__name__)

UNAUTHENTICATED_METHODS = frozenset({"Register"})


class _Malformed:
    """Stands for request bytes that did not parse (the handler refuses it)."""

    def __init__(self, size: int) -> None:
        self.size = size


Reject = Callable[..., Any]
"""``CoordinatorService._reject``: records, counts and aborts."""


def bearer_token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


def is_resent(context: grpc.ServicerContext) -> bool:
    """Whether the client's channel sent this call again after an earlier attempt failed
    (gRPC sets ``grpc-previous-rpc-attempts``; clients cannot set ``grpc-`` keys)."""
    metadata = context.invocation_metadata() or ()
    return any(key == "grpc-previous-rpc-attempts" for key, _ in metadata)


def tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that returns a marker for bytes that are not a valid message."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:
            return _Malformed(len(data))

    return deserialize


class InFlight:
    """Calls in progress per worker, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def enter(self, worker_id: str) -> bool:
        with self._lock:
            n = self._counts.get(worker_id, 0)
            if n >= self.limit:
                return False
            self._counts[worker_id] = n + 1
            return True

    def leave(self, worker_id: str) -> None:
        with self._lock:
            n = self._counts.get(worker_id, 0) - 1
            if n > 0:
                self._counts[worker_id] = n
            else:
                self._counts.pop(worker_id, None)


class Watched(NamedTuple):
    touch: Callable[[], None]
    done: Callable[[], None]
    idle: Callable[[], bool]


class IdleWatch:
    """Cancels streams that made no progress for ``timeout_s`` (one sweep on the event
    loop for all of them, started with the first stream)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._streams: dict[int, tuple[list[float], asyncio.Task[Any], str]] = {}
        self._sweep: asyncio.Task[None] | None = None

    @contextmanager
    def watching(self, method: str) -> Iterator[Watched]:
        """Yields a handle: ``touch()`` whenever the stream makes progress, ``done()`` once
        the peer has nothing more to send (the server's own work is not idleness), and
        ``idle()``: whether this watch cancelled the calling task."""
        seen = [time.monotonic(), 0.0]
        key = id(seen)
        task = asyncio.current_task()
        assert task is not None
        self._streams[key] = (seen, task, method)
        if self._sweep is None or self._sweep.done():
            self._sweep = asyncio.ensure_future(self._run())

        def touch() -> None:
            seen[0] = time.monotonic()

        def done() -> None:
            self._streams.pop(key, None)

        try:
            yield Watched(touch, done, lambda: seen[1] > 0)
        finally:
            done()

    async def _run(self) -> None:
        while self._streams:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            for key, (seen, task, method) in list(self._streams.items()):
                if now - seen[0] > self.timeout_s:
                    del self._streams[key]
                    seen[1] = now
                    metrics.REJECTIONS.labels(reason="stream_idle").inc()
                    log.info("cancelled %s: no progress for %.0f s", method, self.timeout_s)
                    task.cancel()


class Guard:
    """Wraps the generated method handlers (see module docstring). Every handler and the
    ``reject`` it is given are coroutines of a ``grpc.aio`` server."""

    def __init__(
        self, store: Store, settings: CoordinatorSettings, reject: Reject, blocking: Executor
    ) -> None:
        """``blocking``: the threads that run what would stall the event loop (a query)."""
        self.store = store
        self.reject = reject
        self.blocking = blocking
        self.in_flight = InFlight(settings.max_rpcs_per_worker)
        self.idle = IdleWatch(settings.stream_idle_timeout_s)

    def wrap(self, method: str, handler: Any) -> Any:
        handler = handler._replace(request_deserializer=tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._unary_stream(method, handler.unary_stream))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._stream_unary(method, handler.stream_unary))
        raise ValueError(f"{method}: streaming in both directions is not guarded")

    # -- the pieces ----------------------------------------------------------------------

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> str | None:
        """Authenticate (all but Register) and take a slot; the worker id, or None."""
        if is_resent(context):
            metrics.RESENT_CALLS.labels(method=method).inc()
        if method in UNAUTHENTICATED_METHODS:
            return None
        token = bearer_token(context)
        worker: Worker | None = self.store.known_token(token)
        if worker is None:  # not remembered: one query, off the event loop
            worker = await run_blocking(self.blocking, self.store.worker_by_token, token)
        if worker is None:
            await self.reject(
                context,
                WireError(
                    errors_pb2.ERROR_REASON_BAD_TOKEN,
                    "unknown worker or bad token",
                    "authorization",
                ),
            )
            raise AssertionError("unreachable: abort raises")
        if not self.in_flight.enter(worker.id):
            await self.reject(
                context,
                WireError(
                    errors_pb2.ERROR_REASON_RATE_LIMITED,
                    f"more than {self.in_flight.limit} calls in progress for this worker "
                    "(max_rpcs_per_worker); retry later",
                    "",
                ),
                worker_id=worker.id,
            )
        return str(worker.id)

    async def _malformed(
        self, method: str, context: grpc.aio.ServicerContext, request: _Malformed
    ) -> None:
        log.info("rejected %s: %d bytes that are not a valid request message", method, request.size)
        await self.reject(
            context,
            WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                f"{request.size} bytes that are not a valid {method} request",
                "",
            ),
        )

    async def _failed(
        self, method: str, context: grpc.aio.ServicerContext, error: BaseException
    ) -> None:
        """Turn an exception into the caller's answer (re-raises what gRPC handles itself)."""
        if isinstance(error, grpc.aio.AbortError | grpc.RpcError) or context.done():
            raise error  # already aborted with a status, or the caller went away
        if isinstance(error, WireError):
            await self.reject(context, error)
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s in %s", error_id, method, exc_info=error)
        metrics.INTERNAL_ERRORS.labels(method=method).inc()
        await context.abort_with_status(
            rich_status(
                WireError(
                    errors_pb2.ERROR_REASON_INTERNAL,
                    f"internal error {error_id}; the coordinator's log has the details",
                )
            )
        )

    async def _cancelled(
        self, method: str, context: grpc.aio.ServicerContext, watch: Watched
    ) -> None:
        """After a cancellation: the idle watch's ends the call as CANCELLED with a
        reason; any other (the server stopping, the caller gone) goes on."""
        if not watch.idle():
            raise asyncio.CancelledError
        await context.abort(
            grpc.StatusCode.CANCELLED,
            f"{method}: no progress for {self.idle.timeout_s:g} s (stream_idle_timeout_s)",
        )

    # -- per handler kind ----------------------------------------------------------------

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            worker_id = None
            try:
                if isinstance(request, _Malformed):
                    await self._malformed(method, context, request)
                worker_id = await self._admit(method, context)
                return await behavior(request, context)
            except Exception as e:
                await self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run

    def _unary_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            worker_id = None
            try:
                if isinstance(request, _Malformed):
                    await self._malformed(method, context, request)
                worker_id = await self._admit(method, context)
                with self.idle.watching(method) as watch:
                    try:
                        async for response in behavior(request, context):
                            yield response
                            watch.touch()
                    except asyncio.CancelledError:
                        await self._cancelled(method, context, watch)
            except Exception as e:
                await self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run

    def _stream_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def run(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            worker_id = None
            try:
                worker_id = await self._admit(method, context)
                with self.idle.watching(method) as watch:

                    async def checked() -> AsyncIterator[Any]:
                        async for request in requests:
                            watch.touch()
                            if isinstance(request, _Malformed):
                                raise WireError(
                                    errors_pb2.ERROR_REASON_MALFORMED,
                                    f"{request.size} bytes that are not a valid {method} message",
                                )
                            yield request
                        watch.done()  # verifying and storing may take long: not idleness

                    try:
                        return await behavior(checked(), context)
                    except asyncio.CancelledError:
                        await self._cancelled(method, context, watch)
            except Exception as e:
                await self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run
