"""The certificate Job's script (deploy/k8s/base/certs/issue-certs.py) against a stand-in
of the Kubernetes Secrets API (https, bearer token, 404/409 as the API server answers).

It runs the real ``fedpilot certs``; the Secrets it stores must hold a certificate for
the configured names signed by the CA it publishes, and a second run must keep them.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import os
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography import x509

from fedpilot.tls import make_cluster_certs
from tests.deploy.manifests import K8S, SECRETS, render

SCRIPT = K8S / "base" / "certs" / "issue-certs.py"
NAMESPACE = "fedpilot"
TOKEN = "service-account-token"


class SecretsApi(http.server.ThreadingHTTPServer):
    store: dict[str, dict[str, Any]]
    calls: list[tuple[str, str]]


class Handler(http.server.BaseHTTPRequestHandler):
    server: SecretsApi
    prefix = f"/api/v1/namespaces/{NAMESPACE}/secrets"

    def log_message(self, *args: Any) -> None:
        pass

    def reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self, method: str) -> None:
        self.server.calls.append((method, self.path))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.reply(401, {"reason": "Unauthorized"})
        if not self.path.startswith(self.prefix):
            return self.reply(404, {"reason": "NotFound"})
        name = self.path[len(self.prefix) :].strip("/")
        body = None
        if method in ("POST", "PUT"):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if method == "GET":
            if name in self.server.store:
                return self.reply(200, self.server.store[name])
            return self.reply(404, {"reason": "NotFound"})
        assert body is not None
        if method == "POST":
            key = body["metadata"]["name"]
            if key in self.server.store:
                return self.reply(409, {"reason": "AlreadyExists"})
            self.server.store[key] = body
            return self.reply(201, body)
        if name not in self.server.store:
            return self.reply(404, {"reason": "NotFound"})
        self.server.store[name] = body
        return self.reply(200, body)

    def do_GET(self) -> None:
        self.handle_any("GET")

    def do_POST(self) -> None:
        self.handle_any("POST")

    def do_PUT(self) -> None:
        self.handle_any("PUT")


@pytest.fixture()
def api_server(tmp_path: Path) -> Iterator[tuple[SecretsApi, Path]]:
    pki = make_cluster_certs(tmp_path / "apiserver", hosts=["127.0.0.1"])
    server = SecretsApi(("127.0.0.1", 0), Handler)
    server.store, server.calls = {}, []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(TOKEN)
    (account / "namespace").write_text(NAMESPACE)
    (account / "ca.crt").write_bytes(pki.ca.read_bytes())
    try:
        yield server, account
    finally:
        server.shutdown()


def load_script(account: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("issue_certs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ACCOUNT = account  # where the kubelet mounts the service account
    return module


def hosts_of_the_job() -> list[str]:
    (job,) = [d for d in render("base") if d["kind"] == "Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    hosts: list[str] = env["COORDINATOR_HOSTS"].split()
    return hosts


def decoded(secret: dict[str, Any]) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def test_the_job_stores_verifiable_certificates_once(
    api_server: tuple[SecretsApi, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, account = api_server
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    hosts = hosts_of_the_job()
    monkeypatch.setenv("COORDINATOR_HOSTS", " ".join(hosts))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    script = load_script(account)

    assert script.main() == 0
    tls, public = decoded(server.store["fedpilot-tls"]), decoded(server.store["fedpilot-tls-ca"])
    assert set(tls) == SECRETS["fedpilot-tls"] and set(public) == SECRETS["fedpilot-tls-ca"]
    assert public["ca.pem"] == tls["ca.pem"]
    ca = x509.load_pem_x509_certificate(tls["ca.pem"])
    cert = x509.load_pem_x509_certificate(tls["server.pem"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    listed = {str(n.value) for n in names}
    assert set(hosts) <= listed, listed
    assert b"PRIVATE KEY" in tls["server-key.pem"]
    assert not any(b"PRIVATE KEY" in v for v in public.values()), "the CA Secret holds a key"

    # Re-applying the manifests re-runs the Job: nothing rotates under running workers.
    before = dict(server.store)
    assert script.main() == 0
    assert server.store["fedpilot-tls"] == before["fedpilot-tls"]
    assert decoded(server.store["fedpilot-tls-ca"]) == public
    # A lost CA Secret is rebuilt from the coordinator's, not from a new CA.
    del server.store["fedpilot-tls-ca"]
    assert script.main() == 0
    assert decoded(server.store["fedpilot-tls-ca"])["ca.pem"] == tls["ca.pem"]


def test_the_job_refuses_without_names(
    api_server: tuple[SecretsApi, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, account = api_server
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.server_address[1]))
    monkeypatch.setenv("COORDINATOR_HOSTS", "  ")
    assert load_script(account).main() == 2
    assert server.store == {} and server.calls == []
