"""Adapter transfer through the real coordinator against bare gRPC and raw TCP.

A coordinator process serves a job whose adapter is ``size_mib`` large; a
test worker (this process) downloads version 0 and uploads a full update,
with every check of the real path (token, assignment, manifest, digest,
finiteness, blob write, database row). Baselines, each a separate process on
loopback with the same bytes: a bare grpcio stream with the same chunk size,
and a raw TCP socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedpilot.cluster import LocalCluster
from fedpilot.core.aggregation import flatten
from fedpilot.v1 import coordinator_pb2, profile_pb2, transfer_pb2
from fedpilot.wire.payload import MAX_CHUNK_BYTES, tensor_specs

MIB = 1 << 20
_RAW = {"request_serializer": None, "response_deserializer": None}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _shapes(size_mib: int, rank: int = 8) -> dict[str, dict[str, tuple[int, int]]]:
    """Modules of 4 MiB each (two 2 MiB factors: rank x 65536 and 65536 x rank float32)."""
    width = MIB // (2 * rank)
    return {
        f"m{i:03d}": {"lora_A": (rank, width), "lora_B": (width, rank)}
        for i in range(max(1, size_mib // 4))
    }


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss(pid: int, field: str = "VmRSS") -> int:
    """Resident bytes; ``RssAnon`` counts heap only, without file pages mapped for reading."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class _RssSampler:
    """Peak resident memory of a process while a block runs (sampled every 5 ms): the
    transfer's own footprint, apart from the aggregation that follows an upload."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.peak_anon = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss(self.pid))
            self.peak_anon = max(self.peak_anon, _rss(self.pid, "RssAnon"))

    def __enter__(self) -> _RssSampler:
        self.peak = _rss(self.pid)
        self.start_anon = self.peak_anon = _rss(self.pid, "RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss(self.pid))


def _reset_hwm(pid: int) -> None:
    # Not permitted everywhere: the peak then includes start-up.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


# -- baselines (run as `python -m fedpilot.bench.transfer serve-grpc|serve-tcp PORT SIZE`) -----


def _serve_grpc(port: int, size: int) -> None:
    from concurrent import futures

    payload = os.urandom(MAX_CHUNK_BYTES)

    def download(request: bytes, context: Any) -> Iterator[bytes]:
        for start in range(0, size, MAX_CHUNK_BYTES):
            yield payload[: min(MAX_CHUNK_BYTES, size - start)]

    def upload(requests: Iterator[bytes], context: Any) -> bytes:
        total = sum(len(r) for r in requests)
        return total.to_bytes(8, "little")

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw",
        {
            "Download": grpc.unary_stream_rpc_method_handler(download),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[
            ("grpc.max_receive_message_length", 2 * MAX_CHUNK_BYTES),
            ("grpc.max_send_message_length", 2 * MAX_CHUNK_BYTES),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def _serve_tcp(port: int, size: int) -> None:
    block = os.urandom(MAX_CHUNK_BYTES)
    with socket.create_server(("127.0.0.1", port)) as srv:
        while True:
            conn, _ = srv.accept()
            with conn, contextlib.suppress(OSError):
                mode = conn.recv(1)
                if not mode:  # a readiness probe
                    continue
                if mode == b"u":
                    left = size
                    while left:
                        left -= len(conn.recv(min(left, 4 * MIB)))
                    conn.sendall(b"k")
                else:
                    sent = 0
                    while sent < size:
                        n = min(MAX_CHUNK_BYTES, size - sent)
                        conn.sendall(block[:n])
                        sent += n


def _spawn(kind: str, port: int, size: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedpilot.bench.transfer", kind, str(port), str(size)]
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} baseline did not start")


def _grpc_rates(port: int, size: int) -> dict[str, float]:
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 2 * MAX_CHUNK_BYTES)]
    )
    down = channel.unary_stream("/bench.Raw/Download", **_RAW)
    up = channel.stream_unary("/bench.Raw/Upload", **_RAW)
    chunk = os.urandom(MAX_CHUNK_BYTES)
    start = time.perf_counter()
    got = sum(len(c) for c in down(b""))
    t_down = time.perf_counter() - start
    start = time.perf_counter()
    up(chunk[: min(MAX_CHUNK_BYTES, size - i)] for i in range(0, size, MAX_CHUNK_BYTES))
    t_up = time.perf_counter() - start
    channel.close()
    assert got == size
    return {"download": size / t_down / 1e6, "upload": size / t_up / 1e6}


def _tcp_rates(port: int, size: int) -> dict[str, float]:
    block = os.urandom(4 * MIB)
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(b"u")
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            s.sendall(block[:n])
            sent += n
        s.recv(1)
        t_up = time.perf_counter() - start
    with socket.create_connection(("127.0.0.1", port)) as s:
        start = time.perf_counter()
        s.sendall(b"d")
        left = size
        while left:
            left -= len(s.recv(min(left, 4 * MIB)))
        t_down = time.perf_counter() - start
    return {"download": size / t_down / 1e6, "upload": size / t_up / 1e6}


# -- the real path -------------------------------------------------------------------------


class _RealPath:
    """A coordinator process and a registered test worker; one fresh job per measurement."""

    def __init__(self, cluster: LocalCluster, size_mib: int) -> None:
        from fedpilot.worker.client import CoordinatorClient

        self.cluster = cluster
        self.shapes = _shapes(size_mib)
        rng = np.random.default_rng(0)
        self.update = flatten(
            {
                m: {p: rng.standard_normal(s, dtype=np.float32) for p, s in parts.items()}
                for m, parts in self.shapes.items()
            }
        )
        self.nbytes = sum(x.nbytes for x in self.update.values())
        address = cluster.start_coordinator(evaluate=False)
        self.client = CoordinatorClient(address, timeout_s=600)
        self.client.register("bench", budget_bytes=1 << 50)
        self.pid = cluster.processes["coordinator"].pid
        self.idle_rss, self.idle_anon = _rss(self.pid), _rss(self.pid, "RssAnon")
        self.transfer_rss = self.transfer_anon = self.transfer_growth = 0

    def rates(self) -> dict[str, float]:
        """Download version 0 and upload a full update of a new one-round job."""
        client, store = self.client, self.cluster.store
        job_id = store.create_job(
            "transfer",
            {
                "rounds": 1,
                "min_workers": 1,
                "round_deadline_s": 3600,
                "quorum": 1.0,
                "ig_probe_batches": 0,
                # The synthetic modules' LoRA shapes, which the coordinator checks.
                "lora": {"rank": 8, "target_modules": [".*m[0-9]+"]},
            },
        )
        task = _poll(client, coordinator_pb2.TASK_KIND_PROFILE)
        client.report_profile(
            job_id,
            task.task_id,
            profile_pb2.MemoryProfile(
                base_bytes=1,
                layer_activation_bytes=[1],
                budget_bytes=1 << 50,
                modules=[
                    profile_pb2.ModuleCost(name=m, layer=1, param_bytes=1) for m in self.shapes
                ],
                tensors=tensor_specs(self.update),
            ),
        )
        task = _poll(client, coordinator_pb2.TASK_KIND_TRAIN)
        with _RssSampler(self.pid) as down_rss:
            start = time.perf_counter()
            _, adapter = client.download_adapter(job_id, task.adapter_version, max_bytes=1 << 40)
            t_down = time.perf_counter() - start
        del adapter
        manifest = transfer_pb2.UpdateManifest(
            job_id=job_id, round=task.round, task_id=task.task_id, num_samples=1
        )
        with _RssSampler(self.pid) as up_rss:
            start = time.perf_counter()
            client.upload_update(manifest, self.update)
            t_up = time.perf_counter() - start
        self.transfer_rss = max(self.transfer_rss, down_rss.peak, up_rss.peak)
        self.transfer_anon = max(self.transfer_anon, down_rss.peak_anon, up_rss.peak_anon)
        self.transfer_growth = max(
            self.transfer_growth,
            down_rss.peak_anon - down_rss.start_anon,
            up_rss.peak_anon - up_rss.start_anon,
        )
        # Let the round aggregate before anything else is timed.
        deadline = time.monotonic() + 600
        while (job := store.job(job_id)) is not None and job.state != "done":
            if job.state == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"transfer job ended {job.state}: {job.error}")
            time.sleep(0.2)
        return {"download": self.nbytes / t_down / 1e6, "upload": self.nbytes / t_up / 1e6}


def _poll(client: Any, kind: int) -> coordinator_pb2.Task:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        task = client.poll_task(1000)
        if task is not None and task.kind == kind:
            return task  # type: ignore[no-any-return]
    raise RuntimeError("the coordinator offered no task")


def _seconds(fn: Any, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def breakdown(
    tensors: dict[str, np.ndarray],
    work_dir: Path,
    measured_s: dict[str, float],
    bare_s: dict[str, float],
) -> Iterator[dict[str, Any]]:
    """What each step of each direction costs here, one at a time, in this process, next
    to the real path's time and the bare stream's (the network) for the same bytes.
    ``serial_s`` is the sum, i.e. the time if nothing overlapped; the real path can beat
    it only by overlapping steps on separate cores."""
    import hashlib

    from fedpilot.wire.payload import EncodedPayload, decode_tensors, new_hasher

    payload = EncodedPayload(tensors)
    data = payload.to_bytes()
    chunks = list(payload.chunks())
    nbytes = len(data)
    path = work_dir / "breakdown.bin"

    def write() -> None:
        with path.open("wb") as f:
            for c in chunks:
                f.write(c)

    def read() -> None:
        with path.open("rb") as f:
            while f.read(MAX_CHUNK_BYTES):
                pass

    def fsync() -> None:
        with path.open("rb+") as f:
            os.fsync(f.fileno())

    def blake3_chunks() -> None:
        hasher = new_hasher("blake3")
        for c in chunks:
            hasher.update(c)
        hasher.hexdigest()

    def build_messages() -> None:
        for c in chunks:
            transfer_pb2.UploadUpdateRequest(data=c).SerializeToString()

    wire = [transfer_pb2.UploadUpdateRequest(data=c).SerializeToString() for c in chunks]

    def parse_messages() -> None:
        for w in wire:
            _ = transfer_pb2.UploadUpdateRequest.FromString(w).data

    def assemble() -> None:
        buffer = np.empty(nbytes, dtype=np.uint8)
        pos = 0
        for c in chunks:
            buffer[pos : pos + len(c)] = np.frombuffer(c, dtype=np.uint8)
            pos += len(c)

    def finite_scan() -> None:
        for x in decode_tensors(data).values():
            np.isfinite(x).all()

    protobuf = {"proto_build_and_serialize": build_messages, "proto_parse": parse_messages}
    steps: dict[str, dict[str, Any]] = {
        # worker: header + digest, messages; coordinator: messages, BLAKE3 check, the
        # sha256 blobs are stored under, the write, the tensor check, the fsync
        "upload": {
            "encode_blake3": lambda: EncodedPayload(tensors, "blake3"),
            **protobuf,
            "blake3_check": blake3_chunks,
            "sha256_content_address": lambda: hashlib.sha256(data).hexdigest(),
            "file_write": write,
            "finite_scan": finite_scan,
        },
        # coordinator: the blob read in chunks, messages; worker: messages, BLAKE3
        # check, the payload assembled in one buffer, the tensor check
        "download": {
            "file_read": read,
            **protobuf,
            "blake3_check": blake3_chunks,
            "assemble": assemble,
            "finite_scan": finite_scan,
        },
    }
    write()
    seconds = {d: {k: _seconds(fn) for k, fn in parts.items()} for d, parts in steps.items()}
    write()
    seconds["upload"]["fsync_after_write"] = _seconds(fsync, repeats=1)
    path.unlink()
    sha256_encode = _seconds(lambda: EncodedPayload(tensors))
    for direction, parts in seconds.items():
        yield {
            "bench": "transfer_breakdown",
            "direction": direction,
            "bytes": nbytes,
            **{f"{k}_s": round(v, 4) for k, v in parts.items()},
            "network_s": round(bare_s[direction], 4),
            "serial_s": round(sum(parts.values()) + bare_s[direction], 4),
            "measured_s": round(measured_s[direction], 4),
            **({"encode_sha256_s": round(sha256_encode, 4)} if direction == "upload" else {}),
            **{f"{k}_mb_per_s": round(nbytes / v / 1e6, 1) for k, v in parts.items()},
        }


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    return {d: max(r[d] for r in runs) for d in ("upload", "download")}


def run(size_mib: int = 256, repeats: int = 3) -> Iterator[dict[str, Any]]:
    """Each repeat measures the three paths back to back, so a busy machine slows all of
    them alike; the best of ``repeats`` is reported for each."""
    ours: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    tcp: list[dict[str, float]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-transfer-", dir=".") as tmp,
        LocalCluster(Path(tmp) / "cluster", log_level="warning") as cluster,
    ):
        real = _RealPath(cluster, size_mib)
        nbytes = real.nbytes
        g_port, t_port = _free_port(), _free_port()
        grpc_proc = _spawn("serve-grpc", g_port, nbytes)
        tcp_proc = _spawn("serve-tcp", t_port, nbytes)
        try:
            _reset_hwm(real.pid)
            for _ in range(repeats):
                ours.append(real.rates())
                bare.append(_grpc_rates(g_port, nbytes))
                tcp.append(_tcp_rates(t_port, nbytes))
            peak = _vm_hwm(real.pid)
            best_ours, best_bare = _best(ours), _best(bare)
            parts = list(
                breakdown(
                    real.update,
                    Path(tmp),
                    {d: nbytes / v / 1e6 for d, v in best_ours.items()},
                    {d: nbytes / v / 1e6 for d, v in best_bare.items()},
                )
            )
        finally:
            real.client.close()
            grpc_proc.kill()
            tcp_proc.kill()
    best_tcp = _best(tcp)
    for direction in ("upload", "download"):
        yield {
            "bench": "transfer",
            "direction": direction,
            "bytes": nbytes,
            "repeats": repeats,
            "mb_per_s": round(best_ours[direction], 1),
            "grpc_mb_per_s": round(best_bare[direction], 1),
            "tcp_mb_per_s": round(best_tcp[direction], 1),
            "ratio_to_grpc": round(best_ours[direction] / best_bare[direction], 3),
            "ratio_to_tcp": round(best_ours[direction] / best_tcp[direction], 3),
            "coordinator_peak_rss_bytes": real.transfer_rss,
            "coordinator_rss_before_bytes": real.idle_rss,
            "coordinator_peak_anon_bytes": real.transfer_anon,
            "coordinator_anon_before_bytes": real.idle_anon,
            "coordinator_anon_growth_bytes": real.transfer_growth,
            "coordinator_peak_rss_with_aggregation_bytes": peak,
        }
    yield from parts


if __name__ == "__main__":
    kind, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    (_serve_grpc if kind == "serve-grpc" else _serve_tcp)(port, size)
