"""A real coordinator (gRPC + HTTP) on the real PostgreSQL, for the REST API tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

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
def api(
    tmp_path: Path, pg_schema_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    settings = CoordinatorSettings(
        data_dir=tmp_path / "coordinator",
        # The test session's temporary folders (the tiny model, CSVs) are data roots.
        data_roots=[tmp_path / "coordinator", tmp_path_factory.getbasetemp()],
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
