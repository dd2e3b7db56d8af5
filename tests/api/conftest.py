"""A real coordinator (gRPC + HTTP) on the real PostgreSQL, for the REST API tests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings

TOKEN = "api-test-token-0123456789"


@dataclass
class Api:
    coordinator: RunningCoordinator
    url: str
    http: httpx.Client
    """Sends the token."""
    anonymous: httpx.Client
    """Sends none."""


@pytest.fixture()
def pg_schema_url(postgres_url: str) -> Iterator[str]:
    """A fresh schema on the real PostgreSQL for one test."""
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    schema = f"api_{uuid.uuid4().hex[:10]}"
    with engine.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
    yield url.render_as_string(hide_password=False)
    with engine.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture()
def api(tmp_path: Path, pg_schema_url: str) -> Iterator[Api]:
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        database_url=pg_schema_url,
        grpc_port=0,
        http_port=0,
        api_token=TOKEN,
        tick_seconds=0.2,
    )
    running = start(settings)
    url = f"http://127.0.0.1:{running.http_port}"
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        httpx.Client(base_url=url) as anonymous,
    ):
        yield Api(running, url, http, anonymous)
    running.stop(grace=0.5)
