"""A malicious API user against the real coordinator (HTTP on PostgreSQL): files outside the
data roots, bodies before authentication, oversized bodies, NUL and NaN, echoed input.
Each gets a 4xx that reveals nothing, and the server stays responsive."""

from __future__ import annotations

import json
import socket

import pytest

from fedpilot.coordinator.db.models import Job
from tests.api.conftest import TOKEN, Api

GOOD = {"name": "hostile", "labels": ["a", "b"], "rounds": 1}


def _msgs(response) -> list[str]:
    return [e["msg"] for e in response.json()["detail"]]


def test_paths_outside_the_data_roots_are_refused_alike(api: Api) -> None:
    """Attack 4: the coordinator reads no file outside its roots, and its answer is the same
    whether the file exists or not (no content, no existence oracle)."""
    root = api.coordinator.driver.settings.data_roots[0]
    root.mkdir(parents=True, exist_ok=True)
    inside = root / "eval.csv"
    inside.write_text("text,label\nhello,a\nbye,b\n")
    link = root / "innocent.csv"
    link.symlink_to("/etc/passwd")
    attempts = {
        "/etc/passwd": "exists",
        "/etc/no-such-file-anywhere": "missing",
        str(root / ".." / ".." / ".." / ".." / ".." / ".." / "etc" / "passwd"): "dotdot",
        str(link): "symlink",
    }
    answers = {}
    for path, label in attempts.items():
        r = api.http.post("/api/v1/jobs", json={**GOOD, "eval_dataset": path})
        assert r.status_code == 422, (label, r.text)
        assert "root:" not in r.text and "/bin/" not in r.text
        answers[label] = _msgs(r)
    assert len({json.dumps(a) for a in answers.values()}) == 1, answers
    assert "data roots" in answers["exists"][0]
    r = api.http.post("/api/v1/jobs", json={**GOOD, "model": "/etc"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]
    assert api.coordinator.store.count(Job) == 0
    ok = api.http.post("/api/v1/jobs", json={**GOOD, "eval_dataset": str(inside)})
    assert ok.status_code == 201, ok.text


def _send_head(api: Api, head: str, body: bytes = b"") -> tuple[socket.socket, bytes]:
    """Send a request head (and part of a body) on a raw socket; what comes back first."""
    sock = socket.create_connection(("127.0.0.1", api.coordinator.http_port), timeout=10)
    sock.sendall(head.encode() + body)
    return sock, _response(sock)


def _response(sock: socket.socket) -> bytes:
    """One whole response (head and the body its Content-Length announces)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


POST = "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def test_bodies_are_refused_before_they_are_read(api: Api) -> None:
    """Attack 7: a 100 MB body announced without a token is answered 401 after its headers
    (the body is never sent); with the token, 413; a chunked body is cut at the limit; and
    /healthz answers meanwhile."""
    big = 100 * 1024 * 1024
    anonymous, reply = _send_head(api, f"{POST}Content-Length: {big}\r\n\r\n", b"{" + b" " * 1024)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    authorized, reply = _send_head(
        api, f"{POST}Authorization: Bearer {TOKEN}\r\nContent-Length: {big}\r\n\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 413") and b"http_max_body_bytes" in reply, reply[:300]
    chunked = socket.create_connection(("127.0.0.1", api.coordinator.http_port), timeout=10)
    chunked.sendall(
        f"{POST}Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"a" * 65536
    for _ in range(40):  # 2.5 MiB offered; the limit is 1 MiB
        try:
            chunked.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            break
    reply = _response(chunked)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert api.anonymous.get("/healthz", timeout=5).status_code == 200
    for s in (anonymous, authorized, chunked):
        s.close()
    assert api.coordinator.store.count(Job) == 0


def test_a_refused_body_is_not_echoed(api: Api) -> None:
    """Attack 7: a 422 names the field and the rule, never repeats the input."""
    r = api.http.post("/api/v1/jobs", json={**GOOD, "name": "A" * 500_000})
    assert r.status_code == 422
    assert len(r.content) < 2000 and "AAAAAAAAAA" not in r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "name"] and "input" not in error
    many = api.http.post("/api/v1/jobs", json={**GOOD, "labels": [""] * 5000})
    assert many.status_code == 422 and len(many.content) < 10_000
    assert many.json()["more_errors"] > 0


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "x", "learning_rate": NaN}',
        '{"name": "x", "rounds": 2, "round_deadline_s": Infinity}',
        '{"name": "x", "aggregation": {"dwa": {"eta": -Infinity}}}',
        '{"name": "bad\\u0000name"}',
        '{"name": "x", "labels": ["a", "b\\u0000"]}',
        '{"name": "x", "eval_dataset": "/data\\u0000/x.csv"}',
    ],
)
def test_nan_and_nul_in_a_body_are_422_not_500(api: Api, body: str) -> None:
    """Attack 8: JSON that Python parses but PostgreSQL (or JSON itself) cannot carry."""
    r = api.http.post("/api/v1/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert api.coordinator.store.count(Job) == 0


def test_nul_in_a_query_parameter_is_422(api: Api) -> None:
    for value in ("\x00", "waiting\x00"):
        assert api.http.get("/api/v1/jobs", params={"state": value}).status_code == 422
    assert api.http.get("/api/v1/jobs", params={"state": "waiting"}).status_code == 200
