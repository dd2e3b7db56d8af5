"""TLS and mutual TLS on the coordinator's gRPC and HTTP ports, with certificates made by
`fedpilot certs`: the right certificate connects, plaintext and strangers do not."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.tls import ClusterCerts, channel_credentials, make_cluster_certs
from fedpilot.worker.client import CoordinatorClient


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> ClusterCerts:
    return make_cluster_certs(tmp_path_factory.mktemp("pki"), workers=["site-a"])


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> ClusterCerts:
    """Another CA's certificates: valid, but not ours."""
    return make_cluster_certs(tmp_path_factory.mktemp("other-pki"), workers=["site-a"])


def _start(tmp_path: Path, certs: ClusterCerts, mutual: bool) -> RunningCoordinator:
    return start(
        CoordinatorSettings(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            tls_cert=certs.server_cert,
            tls_key=certs.server_key,
            tls_client_ca=certs.ca if mutual else None,
        )
    )


@pytest.fixture()
def tls_server(tmp_path: Path, certs: ClusterCerts) -> Iterator[RunningCoordinator]:
    running = _start(tmp_path, certs, mutual=False)
    yield running
    running.stop(grace=0.2)


@pytest.fixture()
def mtls_server(tmp_path: Path, certs: ClusterCerts) -> Iterator[RunningCoordinator]:
    running = _start(tmp_path, certs, mutual=True)
    yield running
    running.stop(grace=0.2)


def _register(port: int, credentials: grpc.ChannelCredentials | None) -> str:
    client = CoordinatorClient(f"localhost:{port}", credentials=credentials, timeout_s=5)
    try:
        return client.register("site-a", budget_bytes=1 << 30).worker_id
    finally:
        client.close()


def test_tls_accepts_the_right_ca_and_refuses_plaintext_and_strangers(
    tls_server: RunningCoordinator, certs: ClusterCerts, stranger: ClusterCerts
) -> None:
    assert _register(tls_server.port, channel_credentials(certs.ca))
    for credentials in (None, channel_credentials(stranger.ca)):
        with pytest.raises(grpc.RpcError) as e:
            _register(tls_server.port, credentials)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(tls_server.store.workers()) == 1


def test_tls_on_the_http_api(tls_server: RunningCoordinator, certs: ClusterCerts) -> None:
    url = f"https://localhost:{tls_server.http_port}/healthz"
    trust = ssl.create_default_context(cafile=str(certs.ca))
    assert httpx.get(url, verify=trust).json() == {"status": "ok"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)  # the system trust store does not know our CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{tls_server.http_port}/healthz")


def test_mutual_tls_needs_a_client_certificate_from_our_ca(
    mtls_server: RunningCoordinator, certs: ClusterCerts, stranger: ClusterCerts
) -> None:
    cert, key = certs.clients["site-a"]
    assert _register(mtls_server.port, channel_credentials(certs.ca, cert, key))
    other_cert, other_key = stranger.clients["site-a"]
    for credentials in (
        channel_credentials(certs.ca),  # no client certificate
        channel_credentials(certs.ca, other_cert, other_key),  # signed by another CA
    ):
        with pytest.raises(grpc.RpcError) as e:
            _register(mtls_server.port, credentials)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(mtls_server.store.workers()) == 1


def test_bad_tls_settings_are_refused_with_the_reason(tmp_path: Path, certs: ClusterCerts) -> None:
    with pytest.raises(ValueError, match="go together"):
        CoordinatorSettings(data_dir=tmp_path, tls_cert=certs.server_cert)
    with pytest.raises(ValueError, match="needs its key"):
        channel_credentials(certs.ca, cert=certs.server_cert)
    with pytest.raises(ValueError, match="cannot read CA certificate"):
        channel_credentials(tmp_path / "missing.pem")


def test_a_worker_service_registers_over_mutual_tls(
    mtls_server: RunningCoordinator, certs: ClusterCerts, tmp_path: Path
) -> None:
    from fedpilot.worker.service import WorkerService, WorkerSettings

    cert, key = certs.clients["site-a"]
    settings = WorkerSettings(
        coordinator=f"localhost:{mtls_server.port}",
        name="site-a",
        data=tmp_path / "unused.csv",
        memory_budget=1 << 30,
        tls_ca=certs.ca,
        tls_cert=cert,
        tls_key=key,
    )
    service = WorkerService(settings)
    service.register()
    service.client.close()
    assert [w.name for w in mtls_server.store.workers()] == ["site-a"]
    with pytest.raises(ValueError, match="needs --tls-ca"):
        without_ca = WorkerSettings(
            coordinator="localhost:1", name="x", data=tmp_path, memory_budget=1, tls_cert=cert
        )
        WorkerService(without_ca)
