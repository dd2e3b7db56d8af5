"""TLS for gRPC and the HTTP API: credentials from PEM files, and a small CA for test clusters.

Server side: a certificate and key; with a client CA, every worker must present a
certificate that CA signed (mutual TLS). Worker side: the CA that signed the
coordinator's certificate, plus the worker's own certificate under mutual TLS.
:func:`make_cluster_certs` writes a CA and certificates for a test cluster
(``fedpilot certs``); production deployments bring their own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror or e}") from e


def server_credentials(
    cert: Path | str, key: Path | str, client_ca: Path | str | None = None
) -> grpc.ServerCredentials:
    """Credentials of the coordinator's gRPC port; ``client_ca`` turns on mutual TLS."""
    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=_read(client_ca, "client CA"), require_client_auth=True
    )


def channel_credentials(
    ca: Path | str, cert: Path | str | None = None, key: Path | str | None = None
) -> grpc.ChannelCredentials:
    """A worker's credentials: trust ``ca``; present ``cert``/``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "TLS key") if key is not None else None,
        certificate_chain=_read(cert, "TLS certificate") if cert is not None else None,
    )


# --- a CA for test clusters ----------------------------------------------------------


@dataclass(frozen=True)
class ClusterCerts:
    ca: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]
    """Worker name -> (certificate, key)."""


def make_cluster_certs(
    out_dir: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    workers: Sequence[str] = (),
    days: int = 365,
) -> ClusterCerts:
    """A self-signed CA, a server certificate for ``hosts`` and one client certificate
    per worker, as PEM files in ``out_dir`` (keys readable by the owner only)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpilot test cluster"),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
        return path

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("fedpilot test CA"))
        .issuer_name(name("fedpilot test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def issue(cn: str, sans: Sequence[str], usage: x509.ObjectIdentifier) -> tuple:
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for host in sans:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    ca_path = write_cert(ca_cert, out_dir / "ca.pem")
    write_key(ca_key, out_dir / "ca-key.pem")
    server, server_key = issue(hosts[0], hosts, ExtendedKeyUsageOID.SERVER_AUTH)
    clients = {}
    for worker in workers:
        cert, key = issue(worker, (), ExtendedKeyUsageOID.CLIENT_AUTH)
        clients[worker] = (
            write_cert(cert, out_dir / f"worker-{worker}.pem"),
            write_key(key, out_dir / f"worker-{worker}-key.pem"),
        )
    return ClusterCerts(
        ca=ca_path,
        server_cert=write_cert(server, out_dir / "server.pem"),
        server_key=write_key(server_key, out_dir / "server-key.pem"),
        clients=clients,
    )
