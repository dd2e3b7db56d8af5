"""The health checks of compose, Kubernetes and the coordinator image, run against a real
coordinator serving TLS (certificates from ``fedpilot certs``) on the real PostgreSQL.

Each check is taken from the file that ships it, with only the container paths and
ports remapped, and is also shown to fail where it should (wrong CA, plaintext).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.tls import make_cluster_certs
from tests.deploy.manifests import DOCKERFILES, exec_form, load_compose, parse_dockerfile, render

TOKEN = "probe-test-token-0123456789abcdef"


@dataclass
class TlsCoordinator:
    running: RunningCoordinator
    tls: Path
    """What the coordinator's /tls holds: ca.pem, server.pem, server-key.pem."""

    @property
    def http(self) -> int:
        port: int = self.running.http_port
        return port

    @property
    def grpc(self) -> int:
        port: int = self.running.port
        return port


@pytest.fixture()
def coordinator(
    tmp_path_factory: pytest.TempPathFactory, pg_schema_url: str
) -> Iterator[TlsCoordinator]:
    tls = tmp_path_factory.mktemp("tls")
    make_cluster_certs(tls, hosts=["fedpilot-coordinator", "localhost", "127.0.0.1"])
    settings = CoordinatorSettings(
        data_dir=tmp_path_factory.mktemp("coordinator"),
        database_url=pg_schema_url,
        grpc_host="127.0.0.1",
        grpc_port=0,
        http_host="127.0.0.1",
        http_port=0,
        api_token=TOKEN,
        tls_cert=tls / "server.pem",
        tls_key=tls / "server-key.pem",
    )
    running = start(settings)
    try:
        yield TlsCoordinator(running, tls)
    finally:
        running.stop(grace=0.5)


def remap(text: str, server: TlsCoordinator) -> str:
    return (
        text.replace("/tls/", f"{server.tls}/")
        .replace("127.0.0.1:8080", f"127.0.0.1:{server.http}")
        .replace("127.0.0.1:50051", f"127.0.0.1:{server.grpc}")
    )


def run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def foreign_ca(tmp_path: Path) -> Path:
    other = tmp_path / "other"
    make_cluster_certs(other, hosts=["127.0.0.1"])
    return other / "ca.pem"


def test_compose_health_check_verifies_the_certificate(
    coordinator: TlsCoordinator, tmp_path: Path
) -> None:
    test = load_compose()["services"]["coordinator"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    script = remap(test[1], coordinator).replace("python -c", f"{sys.executable} -c", 1)
    done = run(["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    wrong = script.replace(str(coordinator.tls / "ca.pem"), str(foreign_ca(tmp_path)))
    assert run(["sh", "-c", wrong]).returncode != 0, "a certificate from another CA passed"


def coordinator_container() -> dict:  # type: ignore[type-arg]
    (deployment,) = [
        d
        for d in render("base")
        if d["kind"] == "Deployment" and d["metadata"]["name"] == "fedpilot-coordinator"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container  # type: ignore[no-any-return]


def test_kubernetes_liveness_is_grpc_health_over_tls(
    coordinator: TlsCoordinator, tmp_path: Path
) -> None:
    command = coordinator_container()["livenessProbe"]["exec"]["command"]
    argv = [sys.executable if a == "python" else remap(a, coordinator) for a in command]
    done = run(argv)
    assert done.returncode == 0, done.stderr
    wrong = [a.replace(str(coordinator.tls / "ca.pem"), str(foreign_ca(tmp_path))) for a in argv]
    assert run(wrong).returncode != 0, "gRPC health passed with a foreign CA"


def test_kubernetes_http_probes_answer_over_https(coordinator: TlsCoordinator) -> None:
    container = coordinator_container()
    for kind in ("startupProbe", "readinessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["scheme"] == "HTTPS"
        # the kubelet does not verify the serving certificate
        url = f"https://127.0.0.1:{coordinator.http}{probe['path']}"
        assert httpx.get(url, verify=False, timeout=10).status_code == 200, kind
        with pytest.raises(httpx.HTTPError):  # no plaintext beside TLS
            httpx.get(url.replace("https", "http"), timeout=10)


def test_image_health_check_follows_tls(coordinator: TlsCoordinator) -> None:
    (dockerfile,) = [d for d in DOCKERFILES if d.name == "coordinator.Dockerfile"]
    (healthcheck,) = parse_dockerfile(dockerfile)[-1].all("HEALTHCHECK")
    argv = exec_form(healthcheck.args.split(" CMD ", 1)[1])
    assert argv is not None and argv[0] == "python"
    argv = [sys.executable, *(remap(a, coordinator) for a in argv[1:])]
    tls_env = {"FEDPILOT_TLS_CERT": str(coordinator.tls / "server.pem")}
    done = run(argv, tls_env)
    assert done.returncode == 0, done.stderr
    # without FEDPILOT_TLS_CERT it speaks plaintext, which a TLS port refuses
    assert run(argv, {"FEDPILOT_TLS_CERT": ""}).returncode != 0
