"""One-shot: a CA and the coordinator's certificate (``fedpilot certs``) as Secrets.

Run by the Job ``fedpilot-certs`` with the coordinator image and its service
account. Writes

- ``fedpilot-tls``: ``ca.pem``, ``server.pem``, ``server-key.pem`` (mounted by
  the coordinator);
- ``fedpilot-tls-ca``: ``ca.pem`` only (mounted by workers; give it to
  workers outside the cluster too).

Existing Secrets are kept: a second run changes nothing, so re-applying the
manifests never rotates certificates under running workers. Delete both
Secrets and re-run the Job to rotate. The CA key is never stored.
Environment: ``COORDINATOR_HOSTS`` (space-separated names and IPs of the
coordinator; the first is the common name), ``CERT_DAYS``.
"""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def api() -> httpx.Client:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token = (ACCOUNT / "token").read_text().strip()
    namespace = (ACCOUNT / "namespace").read_text().strip()
    return httpx.Client(
        base_url=f"https://{host}:{port}/api/v1/namespaces/{namespace}/secrets",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt")),
        timeout=30,
    )


def secret(name: str, files: dict[str, bytes]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "fedpilot"}},
        "type": "Opaque",
        "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }


def main() -> int:
    hosts = os.environ.get("COORDINATOR_HOSTS", "").split()
    if not hosts:
        print("COORDINATOR_HOSTS is empty", file=sys.stderr)
        return 2
    with api() as client:
        existing = client.get("/fedpilot-tls")
        if existing.status_code == 200:
            ca = base64.b64decode(existing.json()["data"]["ca.pem"])
            print("fedpilot-tls exists: kept")
        elif existing.status_code == 404:
            with tempfile.TemporaryDirectory() as tmp:
                argv = [
                    "fedpilot",
                    "certs",
                    "--out",
                    tmp,
                    "--days",
                    os.environ.get("CERT_DAYS", "365"),
                ]
                for host in hosts:
                    argv += ["--host", host]
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                files = {
                    n: (Path(tmp) / n).read_bytes()
                    for n in ("ca.pem", "server.pem", "server-key.pem")
                }
            ca = files["ca.pem"]
            created = client.post("", json=secret("fedpilot-tls", files))
            created.raise_for_status()
            print(f"fedpilot-tls created for {', '.join(hosts)}")
        else:
            existing.raise_for_status()
            return 1
        public = secret("fedpilot-tls-ca", {"ca.pem": ca})
        answer = client.post("", json=public)
        if answer.status_code == 409:
            answer = client.put("/fedpilot-tls-ca", json=public)
        answer.raise_for_status()
        print("fedpilot-tls-ca holds the CA certificate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
