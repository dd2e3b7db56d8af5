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

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import grpc

from fedpilot.coordinator import metrics
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


class IdleWatch:
    """Cancels streams that made no progress for ``timeout_s`` (one thread for all)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._streams: dict[int, tuple[list[float], grpc.ServicerContext, str]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, context: grpc.ServicerContext, method: str) -> Iterator[Watched]:
        """Yields a handle: ``touch()`` whenever the stream makes progress, ``done()`` once
        the peer has nothing more to send (the server's own work is not idleness)."""
        seen = [time.monotonic()]
        key = id(seen)
        with self._lock:
            self._streams[key] = (seen, context, method)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="idle-watch", daemon=True)
                self._thread.start()

        def touch() -> None:
            seen[0] = time.monotonic()

        def done() -> None:
            with self._lock:
                self._streams.pop(key, None)

        try:
            yield Watched(touch, done)
        finally:
            done()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            now = time.monotonic()
            with self._lock:
                idle = [
                    (key, context, method)
                    for key, (seen, context, method) in self._streams.items()
                    if now - seen[0] > self.timeout_s
                ]
                for key, _, _ in idle:
                    self._streams.pop(key, None)
            for _, context, method in idle:
                metrics.REJECTIONS.labels(reason="stream_idle").inc()
                log.info("cancelled %s: no progress for %.0f s", method, self.timeout_s)
                context.cancel()


class Guard:
    """Wraps the generated method handlers (see module docstring)."""

    def __init__(self, store: Store, settings: CoordinatorSettings, reject: Reject) -> None:
        self.store = store
        self.reject = reject
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

    def _admit(self, method: str, context: grpc.ServicerContext) -> str | None:
        """Authenticate (all but Register) and take a slot; the worker id, or None."""
        if is_resent(context):
            metrics.RESENT_CALLS.labels(method=method).inc()
        if method in UNAUTHENTICATED_METHODS:
            return None
        worker: Worker | None = self.store.worker_by_token(bearer_token(context))
        if worker is None:
            self.reject(
                context,
                WireError(
                    errors_pb2.ERROR_REASON_BAD_TOKEN,
                    "unknown worker or bad token",
                    "authorization",
                ),
            )
            raise AssertionError("unreachable: abort raises")
        if not self.in_flight.enter(worker.id):
            self.reject(
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

    def _malformed(self, method: str, context: grpc.ServicerContext, request: _Malformed) -> None:
        log.info("rejected %s: %d bytes that are not a valid request message", method, request.size)
        self.reject(
            context,
            WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                f"{request.size} bytes that are not a valid {method} request",
                "",
            ),
        )

    def _failed(self, method: str, context: grpc.ServicerContext, error: Exception) -> None:
        """Turn an exception into the caller's answer (re-raises what gRPC handles itself)."""
        if context.code() is not None or isinstance(error, grpc.RpcError):
            raise error  # already aborted with a status, or the caller went away
        if isinstance(error, WireError):
            self.reject(context, error)
        error_id = uuid.uuid4().hex[:12]
        log.error("internal error %s in %s", error_id, method, exc_info=error)
        metrics.INTERNAL_ERRORS.labels(method=method).inc()
        context.abort_with_status(
            rich_status(
                WireError(
                    errors_pb2.ERROR_REASON_INTERNAL,
                    f"internal error {error_id}; the coordinator's log has the details",
                )
            )
        )

    # -- per handler kind ----------------------------------------------------------------

    def _unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            worker_id = None
            try:
                if isinstance(request, _Malformed):
                    self._malformed(method, context, request)
                worker_id = self._admit(method, context)
                return behavior(request, context)
            except Exception as e:
                self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run

    def _unary_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            worker_id = None
            try:
                if isinstance(request, _Malformed):
                    self._malformed(method, context, request)
                worker_id = self._admit(method, context)
                with self.idle.watching(context, method) as watch:
                    for response in behavior(request, context):
                        yield response
                        watch.touch()
            except Exception as e:
                self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run

    def _stream_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            worker_id = None
            try:
                worker_id = self._admit(method, context)
                with self.idle.watching(context, method) as watch:

                    def checked() -> Iterator[Any]:
                        for request in requests:
                            watch.touch()
                            if isinstance(request, _Malformed):
                                raise WireError(
                                    errors_pb2.ERROR_REASON_MALFORMED,
                                    f"{request.size} bytes that are not a valid {method} message",
                                )
                            yield request
                        watch.done()  # verifying and storing may take long: not idleness

                    return behavior(checked(), context)
            except Exception as e:
                self._failed(method, context, e)
            finally:
                if worker_id is not None:
                    self.in_flight.leave(worker_id)

        return run
