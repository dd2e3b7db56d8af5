"""The coordinator process: migrate, then serve gRPC, drive rounds, export metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from fedpilot.coordinator.api.deps import ApiContext, DriverStatus
from fedpilot.coordinator.api.http import HttpServer
from fedpilot.coordinator.cadence import HeartbeatCadence
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.db.store import Store, database_url
from fedpilot.coordinator.guard import Guard
from fedpilot.coordinator.rounds import Evaluator, RoundDriver
from fedpilot.coordinator.service import CoordinatorService
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.coordinator.signals import Signals
from fedpilot.tls import server_credentials
from fedpilot.v1 import coordinator_pb2, coordinator_pb2_grpc
from fedpilot.wire.payload import MAX_CHUNK_BYTES

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "::1", "localhost")

ORPHAN_AGE_S = 300.0
"""Blobs without a row older than this are removed at start (a crash between the two)."""

SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name


T = TypeVar("T")


class GrpcLoop:
    """The event loop every ``grpc.aio`` server of this process runs on, in a thread of its
    own, so :func:`start` stays a plain call beside the driver's and the HTTP API's threads.
    One loop for the process: gRPC's asyncio integration binds to the first loop it sees,
    and tests start many coordinators in one process."""

    _loop: asyncio.AbstractEventLoop | None = None
    _lock = threading.Lock()

    @classmethod
    def run(cls, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (from any other thread)."""
        with cls._lock:
            if cls._loop is None:
                cls._loop = asyncio.new_event_loop()
                threading.Thread(
                    target=cls._loop.run_forever, name="grpc-loop", daemon=True
                ).start()
            loop = cls._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


@dataclass
class RunningCoordinator:
    store: Store
    server: grpc.aio.Server
    port: int
    driver: RoundDriver
    stop_event: threading.Event
    thread: threading.Thread
    service: CoordinatorService
    http: HttpServer | None = None

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    def stop(self, grace: float = 2.0) -> None:
        self.stop_event.set()
        self.driver.signals.upload_accepted()  # a poke: it stops now, not after its tick
        if self.http is not None:
            self.http.stop()
        GrpcLoop.run(self.server.stop(grace))
        self.service.blocking.shutdown(wait=True)  # what cancelled calls left to clean up
        self.thread.join(timeout=10)
        self.store.engine.dispose()


def start(
    settings: CoordinatorSettings, *, evaluator: Evaluator | None = None
) -> RunningCoordinator:
    """Migrate the database, then start the gRPC server and the round driver."""
    url = settings.database_url or database_url(settings.data_dir)
    store = Store.open(url)
    blobs = BlobStore(settings.data_dir / "blobs")
    swept = blobs.sweep(store.referenced_blobs(), older_than_s=ORPHAN_AGE_S)
    if swept:
        log.info("removed %d blobs no row referenced", swept)
    signals = Signals()
    cadence = HeartbeatCadence.from_settings(settings)
    service = CoordinatorService(store, blobs, settings, signals, cadence)
    server, port = GrpcLoop.run(_serve(settings, service))
    if settings.metrics_port is not None:
        start_http_server(settings.metrics_port, addr=settings.grpc_host)
    driver = RoundDriver(store, blobs, settings, signals, cadence, evaluator)
    stop_event = threading.Event()
    thread = threading.Thread(
        target=driver.run, args=(stop_event,), name="round-driver", daemon=True
    )
    http = _start_http(settings, store, blobs, DriverWatch(driver, thread, settings), cadence)
    thread.start()
    log.info(
        "coordinator serving gRPC on %s:%d, %s (database %s)",
        settings.grpc_host,
        port,
        "mutual TLS"
        if settings.tls_client_ca
        else ("TLS" if settings.tls_cert else "plaintext: use TLS beyond a trusted network"),
        store.engine.url.render_as_string(hide_password=True),
    )
    return RunningCoordinator(store, server, port, driver, stop_event, thread, service, http)


async def _serve(
    settings: CoordinatorSettings, service: CoordinatorService
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server, started on :class:`GrpcLoop`: each call a coroutine, so a waiting
    long poll or a slow stream holds no thread (docs/scaling.md: at 500 workers the
    thread-per-call server spent half its CPU in the kernel handing the GIL around)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_CHUNK_BYTES + 64 * 1024),
            ("grpc.max_send_message_length", MAX_CHUNK_BYTES + 64 * 1024),
            ("grpc.max_metadata_size", 16 * 1024),
            ("grpc.server_max_unrequested_time_in_server", settings.grpc_unaccepted_timeout_s),
        ],
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    _add_servicer(service, server)
    health_servicer = health.aio.HealthServicer()  # the asyncio form of the same servicer
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def http_bind_host(settings: CoordinatorSettings) -> str:
    """Where the HTTP API may listen: anywhere with a token, loopback only without one."""
    host = settings.http_host
    if settings.api_token.get_secret_value() or host in LOOPBACK:
        return host
    log.warning(
        "no API token configured (FEDPILOT_API_TOKEN): the HTTP API listens on 127.0.0.1 "
        "only, not on %s",
        host,
    )
    return "127.0.0.1"


def _start_http(
    settings: CoordinatorSettings,
    store: Store,
    blobs: BlobStore,
    driver: DriverWatch,
    cadence: HeartbeatCadence,
) -> HttpServer | None:
    if settings.http_port is None:
        return None
    from fedpilot.coordinator.api.app import create_app

    host = http_bind_host(settings)
    http = HttpServer(
        create_app(ApiContext(store, blobs, settings, cadence, driver=driver.status)),
        host,
        settings.http_port,
        certfile=settings.tls_cert,
        keyfile=settings.tls_key,
    )
    http.start()
    log.info(
        "HTTP API, dashboard and /metrics on %s://%s:%d (%s)",
        http.scheme,
        host,
        http.port,
        "bearer token required" if settings.api_token.get_secret_value() else "no token: loopback",
    )
    return http


class DriverWatch:
    """The round driver's health as the HTTP API reports it."""

    def __init__(
        self, driver: RoundDriver, thread: threading.Thread, settings: CoordinatorSettings
    ) -> None:
        self.driver, self.thread, self.settings = driver, thread, settings

    def status(self) -> DriverStatus:
        started = self.thread.ident is not None
        alive = self.thread.is_alive() or not started
        since = time.monotonic() - self.driver.last_loop
        return DriverStatus(
            alive=alive,
            seconds_since_loop=round(since, 3),
            stalled=since > self.settings.driver_stall_s,
            errors=self.driver.errors,
        )


class _HandlerCapture:
    """Stands in for the server while the generated code registers its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers = dict(handlers)


def _add_servicer(servicer: CoordinatorService, server: grpc.aio.Server) -> None:
    """Register the servicer behind the guard (parsing, authentication, concurrency, idle
    streams, internal errors: see ``guard.py``)."""
    capture = _HandlerCapture()
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, capture)
    guard = Guard(servicer.store, servicer.settings, servicer._reject, servicer.blocking)
    handlers = {name: guard.wrap(name, handler) for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
