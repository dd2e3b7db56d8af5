"""Registration and job submission under attack, against a baseline in the same run.

    python -m fedpilot.bench.hostile [--silent-streams 300] [--threads 16]

Prints JSON lines: ``Register`` latency on an idle coordinator, then with
``silent_streams`` anonymous ``UploadUpdate`` streams open that never send a
message; and the time to parse and validate a job spec at the HTTP body limit
(the work the REST API moves off its event loop).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpilot.coordinator.server import start
from fedpilot.coordinator.settings import CoordinatorSettings


def _register_ms(target: str, count: int) -> list[float]:
    from fedpilot.worker.client import CoordinatorClient

    out = []
    for i in range(count):
        client = CoordinatorClient(target, timeout_s=30)
        begin = time.perf_counter()
        client.register(f"bench-{i}-{time.monotonic_ns()}", budget_bytes=1)
        out.append((time.perf_counter() - begin) * 1e3)
        client.close()
    return out


def _summary(case: str, samples: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "case": case,
        "median_ms": round(statistics.median(samples), 2),
        "max_ms": round(max(samples), 2),
        "n": len(samples),
        **extra,
    }


def registration_under_silent_streams(
    silent_streams: int = 300, threads: int = 16, calls: int = 20
) -> Iterator[dict[str, Any]]:
    import grpc

    from fedpilot.v1 import transfer_pb2

    with tempfile.TemporaryDirectory() as work:
        settings = CoordinatorSettings(
            data_dir=Path(work), grpc_port=0, grpc_threads=threads, registrations_per_s=1e5
        )
        coordinator = start(settings)
        target = f"127.0.0.1:{coordinator.port}"
        try:
            _register_ms(target, 3)  # warm-up: first connections, caches
            yield _summary("register, idle", _register_ms(target, calls), threads=threads)
            channel = grpc.insecure_channel(target)
            upload = channel.stream_unary(
                "/fedpilot.v1.Coordinator/UploadUpdate",
                request_serializer=transfer_pb2.UploadUpdateRequest.SerializeToString,
                response_deserializer=transfer_pb2.UploadUpdateRequest.FromString,
            )
            release = threading.Event()

            def silent() -> Iterator[transfer_pb2.UploadUpdateRequest]:
                release.wait(120)
                yield from ()

            streams = [upload.future(silent(), timeout=60) for _ in range(silent_streams)]
            time.sleep(0.5)
            yield _summary(
                f"register, {silent_streams} silent upload streams",
                _register_ms(target, calls),
                threads=threads,
                refused_streams=sum(1 for s in streams if s.done() and s.exception()),
            )
            release.set()
            channel.close()
        finally:
            coordinator.stop(grace=0.2)


def spec_parsing_at_the_body_limit(limit: int = 1 << 20) -> Iterator[dict[str, Any]]:
    from fedpilot.coordinator.api.jobs import parse_spec

    labels = [f"label-{i:07d}" for i in range(limit // 17)]
    body = json.dumps({"name": "x", "labels": labels}).encode()
    while len(body) > limit:
        del labels[-100:]
        body = json.dumps({"name": "x", "labels": labels}).encode()
    samples = []
    for _ in range(3):
        begin = time.perf_counter()
        with contextlib.suppress(Exception):  # the labels exceed the spec's bounds: refused
            parse_spec(body)
        samples.append((time.perf_counter() - begin) * 1e3)
    yield _summary("parse and validate a job spec at the body limit", samples, bytes=len(body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--silent-streams", type=int, default=300)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    for row in registration_under_silent_streams(args.silent_streams, args.threads):
        print(json.dumps(row), flush=True)
    for row in spec_parsing_at_the_body_limit():
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
