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
    grpc_threads: Annotated[int, Field(ge=4, le=10_000)] = 512
    """Handler threads. Each waiting long poll holds one, so this bounds how many workers
    can wait for a task at once without queueing everyone else's calls."""
    heartbeat_interval_ms: Annotated[int, Field(ge=100, le=600_000)] = 2_000
    heartbeat_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 15.0
    enrollment_secret: SecretStr = SecretStr("")
    max_upload_bytes: Annotated[int, Field(ge=1024)] = 1 << 30
    registrations_per_s: Annotated[float, Field(gt=0, le=1e6)] = 50.0
    """Sustained registration rate; beyond it Register answers RESOURCE_EXHAUSTED."""
    registration_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 2000
    """Registrations accepted at once (a whole fleet starting together)."""
    max_poll_wait_ms: Annotated[int, Field(ge=0, le=120_000)] = 20_000
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

    @model_validator(mode="after")
    def _tls_pair(self) -> CoordinatorSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self
