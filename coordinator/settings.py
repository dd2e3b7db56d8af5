"""Coordinator settings: flags, or ``FEDPILOT_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDPILOT_", extra="ignore")

    data_dir: Path = Path("./data/coordinator")
    database_url: str = Field(
        "", description="postgresql+psycopg://... ; empty = SQLite file in data_dir."
    )
    grpc_host: str = "127.0.0.1"
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = 50051
    grpc_threads: Annotated[int, Field(ge=1, le=10_000)] = 4
    """Threads for the calls' blocking work: queries, blob reads, checks and fsyncs of
    uploads. Calls themselves are coroutines on one event loop, so a waiting long poll
    holds none. Each thread more is one more to hand the interpreter lock around: at 500
    workers on PostgreSQL, 16 closed rounds in 10.1 s and 4 in 6.0-7.1 s
    (docs/benchmarks.md, "Load"); raise it only for a database far away."""
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=600_000)] = 2_000
    heartbeat_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    """Liveness timeout at ``heartbeat_interval_ms``; it grows with the interval."""
    heartbeats_per_s: Annotated[float, Field(gt=0, le=1e6)] = 100.0
    """Fleet-wide heartbeat rate aimed at: beyond ``heartbeats_per_s x interval`` workers
    (200 by default) the interval handed out grows with the fleet, up to 60 s, and the
    liveness timeout with it (``coordinator/cadence.py``)."""
    enrollment_secret: SecretStr = SecretStr("")
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    registrations_per_s: Annotated[float, Field(gt=0, le=1e6)] = 50.0
    """Sustained registration rate; beyond it Register answers RESOURCE_EXHAUSTED."""
    registration_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    """Registrations accepted at once (a whole fleet starting together)."""
    max_poll_wait_ms: Annotated[int, Field(ge=0, le=120_000)] = 20_000
    task_wave_per_s: Annotated[float, Field(ge=0, le=1e6)] = 400.0
    """Polls answered per second when new tasks wake many at once: each of N woken polls
    answers at a random moment within N / ``task_wave_per_s`` seconds (5 s at 2,000), so
    the downloads and reports that follow do not arrive as one burst. 0: all at once."""
    tick_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5
    metrics_port: Annotated[int | None, Field(ge=0, le=65535)] = None
    """A separate Prometheus port (None = off; the HTTP API serves /metrics anyway)."""
    http_host: str = "127.0.0.1"
    http_port: Annotated[int | None, Field(ge=0, le=65535)] = None
    """REST API, dashboard and /metrics (None = no HTTP server)."""
    tls_cert: Path | None = None
    """PEM certificate of the gRPC and HTTP ports (with ``tls_key``); unset = plaintext."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """Require worker certificates signed by this CA on gRPC (mutual TLS)."""
    api_token: SecretStr = SecretStr("")
    """Bearer token of the REST API. Empty: the HTTP server binds to loopback only."""

    # -- limits against hostile workers and API users (docs/security.md) ------------------
    data_roots: list[Path] = []
    """Folders the coordinator may read job files from (``eval_dataset``, a ``model``'s
    config.json). Empty: ``data_dir`` and the bundled datasets."""
    grpc_max_concurrent_rpcs: Annotated[int, Field(ge=1, le=1_000_000)] = 2048
    """RPCs in progress at once; beyond it gRPC answers RESOURCE_EXHAUSTED at once."""
    grpc_unaccepted_timeout_s: Annotated[int, Field(ge=1, le=3600)] = 300
    """How long a call received but not yet taken up by the server may wait before gRPC
    cancels it (gRPC's own default is 30 s). Under load the one thread that takes
    calls in falls behind, and at 2,000 workers on two cores gRPC cancelled long polls
    and registrations after exactly 30 s; a longer limit lets the client's own deadline
    decide instead."""
    max_rpcs_per_worker: Annotated[int, Field(ge=1, le=10_000)] = 8
    """RPCs one worker may have in progress (an honest worker uses about three)."""
    stream_idle_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    """An upload stream silent for this long is cancelled."""
    max_adapter_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    """Upper bound on the global adapter's size (float32 bytes of all its tensors)."""
    max_tensor_dim: Annotated[int, Field(ge=1, le=1 << 24)] = 65_536
    """Largest dimension of an adapter tensor when the model's config.json is not readable."""
    max_profile_modules: Annotated[int, Field(ge=1, le=1_000_000)] = 10_000
    """Modules (and so local scores) a profile or an update may list."""
    max_labels: Annotated[int, Field(ge=0, le=10_000)] = 32
    """Registration labels per worker."""
    max_label_chars: Annotated[int, Field(ge=1, le=100_000)] = 256
    """Characters of one label key or value."""
    http_max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 1 << 20
    """Largest HTTP request body, refused with 413 before it is read."""
    driver_stall_s: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    """``/readyz`` answers 503 when the round driver has not finished a loop for this long
    (``/healthz`` does when its thread has died)."""
    metrics_max_workers: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Per-worker Prometheus series kept (the most recently active workers)."""

    @model_validator(mode="after")
    def _tls_pair(self) -> CoordinatorSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self
