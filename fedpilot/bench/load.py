"""`fedpilot bench load`: many light simulated workers against a real coordinator.

The coordinator runs as its own process (``fedpilot coordinator``, the same
command operators run) on PostgreSQL when a URL is given, so its CPU time and
peak memory are its own. ``workers`` simulated workers run as threads in a
few subprocesses and speak the real protocol through
:class:`fedpilot.worker.client.CoordinatorClient`: register, heartbeat,
long-poll, report a profile, download the adapter, upload real float32
tensors of their assigned modules. They skip training, so the load is the
protocol itself. Every unary RPC is timed on the caller's side (the long poll
is not: it waits by design); registrations are all started at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(frozen=True)
class LoadConfig:
    rounds: int = 2
    layers: int = 2
    """Of the synthetic encoder: small tensors, so the load is RPCs, not bytes."""
    rank: int = 4
    poll_wait_ms: int = 20_000
    """As the real worker asks (``WorkerSettings.poll_wait_ms``)."""
    workers_per_process: int = 125
    timeout_s: float = 600.0
    database_url: str = ""


# -- the simulated workers (a subprocess: `python -m fedpilot.bench.load ...`) --------------


class _Timed:
    """Caller-side latency of every RPC, by method (thread-safe appends)."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.debug: list[str] = []
        self.failed_after: dict[str, list[float]] = {}
        """Seconds each failed call ran before it failed, by ``call status``: a call the
        server's gRPC core dropped unrequested fails at that limit (30 s by default)."""
        self.lock = threading.Lock()

    def failed(self, step: str, error: Any, elapsed: float, index: int | str) -> None:
        name = f"{step} {error.code().name}"
        with self.lock:
            self.errors.append(f"{name}: {error.details()}")
            self.failed_after.setdefault(name, []).append(elapsed)
            if len(self.debug) < 20:
                self.debug.append(f"{index} {step}: {error.debug_error_string()}")

    def __call__(self, method: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            elapsed = time.perf_counter() - start
            with self.lock:
                self.latencies.setdefault(method, []).append(elapsed)


def _worker(
    address: str,
    index: int,
    config: LoadConfig,
    timed: _Timed,
    go: threading.Event,
    stop: threading.Event,
    clients: list[Any],
    registered: list[tuple[float, float]],
) -> None:
    """One simulated worker; ``clients`` gets its client once registered."""
    import grpc

    from fedpilot.bench.round import simulated_update
    from fedpilot.bench.synthetic import encoder_memory
    from fedpilot.v1 import coordinator_pb2, profile_pb2
    from fedpilot.wire.payload import tensor_specs
    from fedpilot.wire.serde import memory_to_proto
    from fedpilot.worker.client import CoordinatorClient

    memory = encoder_memory(layers=config.layers, rank=config.rank, targets=2, batch=1, seq=8)
    budget = memory.full_cost() * 2
    # Each on its own TCP connection, as workers on their own hosts; gRPC would otherwise
    # multiplex a whole process's workers over one.
    client = CoordinatorClient(address, timeout_s=120, own_connection=True)
    rng = np.random.default_rng(index)
    profile = None
    go.wait()
    step = "Register"  # the call in progress, named in an error
    while not stop.is_set():
        began = time.perf_counter()
        try:
            if not client.worker_id:
                step = "Register"
                start = time.perf_counter()
                timed(
                    "Register",
                    lambda: client.register(f"load{index}", budget_bytes=budget),
                )
                registered.append((start, time.perf_counter()))
                clients.append(client)
            step, began = "PollTask", time.perf_counter()
            task = client.poll_task(config.poll_wait_ms)
            if task is None:
                continue
            if task.kind == coordinator_pb2.TASK_KIND_PROFILE:
                if profile is None:
                    from fedpilot.bench.synthetic import lora_update
                    from fedpilot.core.aggregation import flatten

                    shapes = flatten(lora_update(memory, config.rank, seed=0))
                    profile = memory_to_proto(
                        memory,
                        budget,
                        method=profile_pb2.PROFILE_METHOD_SAVED_TENSORS,
                        device="cpu",
                        tensors=tensor_specs(shapes),
                    )
                step, began = "ReportProfile", time.perf_counter()
                timed(
                    "ReportProfile",
                    lambda t=task, p=profile: client.report_profile(t.job_id, t.task_id, p),
                )
                continue
            step, began = "DownloadAdapter", time.perf_counter()
            if task.HasField("adapter"):  # it came with the task: no call to time
                _, adapter = client.adapter_for(task)
            else:
                _, adapter = timed(
                    "DownloadAdapter",
                    lambda t=task: client.download_adapter(t.job_id, t.adapter_version),
                )
            manifest, update = simulated_update(task, adapter, rng)
            step, began = "UploadUpdate", time.perf_counter()
            timed("UploadUpdate", lambda m=manifest, u=update: client.upload_update(m, u))
        except grpc.RpcError as e:
            if stop.is_set():
                break
            timed.failed(step, e, time.perf_counter() - began, index)
            stop.wait(0.5)


HEARTBEAT_THREADS = 8
"""Heartbeats of one process's workers sent this many at a time. A real worker beats
from its own thread once per interval; a serial sweep over a process's workers
stretched the interval by the sum of their latencies, so the bench sent fewer
heartbeats than a real fleet of its size."""


def _told_interval_s(client: Any) -> float:
    """As its last Register, Heartbeat or PollTask answer said (2 s before any)."""
    return float(client.heartbeat_interval_ms / 1000 or 2.0)


def _heartbeats(clients: list[Any], timed: _Timed, stop: threading.Event) -> None:
    """Every worker's heartbeat once per the interval the coordinator last told it
    (start to start, as a worker's own heartbeat thread would), a few at a time, and
    as the worker does, none while an open long poll keeps it alive."""
    import grpc

    due: dict[Any, float] = {}

    def beat(client: Any) -> None:
        began = time.perf_counter()
        try:
            timed("Heartbeat", client.heartbeat)
        except grpc.RpcError as e:
            if not stop.is_set():
                timed.failed("Heartbeat", e, time.perf_counter() - began, "beat")

    with ThreadPoolExecutor(HEARTBEAT_THREADS, thread_name_prefix="heartbeat") as pool:
        while not stop.wait(0.05):
            now = time.monotonic()
            ready = []
            for client in list(clients):
                interval = _told_interval_s(client)
                when = due.setdefault(client, now + interval)
                if when <= now:
                    if client.heartbeat_needed:  # not while its long poll keeps it alive
                        ready.append(client)
                    due[client] = max(when + interval, now)
            list(pool.map(beat, ready))


def serve(address: str, first: int, count: int, config: LoadConfig, out: Path) -> None:
    """Run ``count`` simulated workers until SIGTERM, then write what they measured."""
    stop, go = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    timed = _Timed()
    clients: list[Any] = []
    registered: list[tuple[float, float]] = []
    threads = [
        threading.Thread(
            target=_worker,
            args=(address, first + i, config, timed, go, stop, clients, registered),
            daemon=True,
        )
        for i in range(count)
    ]
    for t in threads:
        t.start()
    # The parent starts every process's registrations at the same moment.
    (out.parent / f"ready-{first}").touch()
    while not (out.parent / "go").exists() and not stop.is_set():
        time.sleep(0.01)
    go.set()
    threading.Thread(target=_heartbeats, args=(clients, timed, stop), daemon=True).start()
    stop.wait()
    out.write_text(
        json.dumps(
            {
                "latencies": timed.latencies,
                "errors": timed.errors,
                "debug": timed.debug,
                "failed_after": timed.failed_after,
                "registered": registered,
                "intervals": [_told_interval_s(client) for client in clients],
                "clock_offset": time.time() - time.perf_counter(),
            }
        )
    )


# -- the coordinator's process -------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU-seconds every core of the machine has spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle and iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples, every ``period_s``, the CPU-seconds used so far by the coordinator, by
    the simulated fleet and by the whole machine, so a round's CPU can be read off
    between its start and its close: what it cost, and (the machine's busy share) how
    much idle CPU a faster coordinator could have used on these cores."""

    def __init__(self, coordinator: int, fleet: list[int], period_s: float = 0.1) -> None:
        self.coordinator, self.fleet, self.period_s = coordinator, fleet, period_s
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _sample(self) -> None:
        fleet = 0.0
        for pid in self.fleet:
            with contextlib.suppress(OSError, IndexError):
                fleet += _cpu_seconds(pid)
        self.samples.append((time.time(), _cpu_seconds(self.coordinator), fleet, _machine_busy_s()))

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.period_s) if self.samples else False
            with contextlib.suppress(OSError, IndexError):
                self._sample()  # once more on stop: the last window ends inside
            if stopping:
                return

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU-seconds used from ``start`` to ``end`` (wall-clock seconds since the epoch),
        read at the samples that enclose the window (a period more at most); empty if the
        sampler did not run across it."""
        before = [s for s in self.samples if s[0] <= start]
        after = [s for s in self.samples if s[0] >= end]
        if not before or not after:
            return {}
        first, last = before[-1], after[0]
        return {
            "coordinator": last[1] - first[1],
            "fleet": last[2] - first[2],
            "machine": last[3] - first[3],
            "span_s": last[0] - first[0],
        }


def round_cpu(sampler: CpuSampler, windows: list[tuple[float, float]]) -> dict[str, Any]:
    """Mean CPU-seconds per round by who used them, and the machine's busy share: near 1
    the round was bounded by these cores, not by waiting."""
    per = [sampler.between(s, e) for s, e in windows]
    per = [p for p in per if p and p["span_s"] > 0]
    if not per:
        return {}
    cores = os.cpu_count() or 1
    mean = {k: float(np.mean([p[k] for p in per])) for k in ("coordinator", "fleet", "machine")}
    busy = float(np.mean([p["machine"] / (p["span_s"] * cores) for p in per]))
    return {
        "coordinator_cpu_s": round(mean["coordinator"], 2),
        "fleet_cpu_s": round(mean["fleet"], 2),
        "machine_cpu_s": round(mean["machine"], 2),
        "machine_busy_share": round(busy, 3),
        "cores": cores,
    }


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


_PHASES = ("first_upload", "median_upload", "p90_upload", "last_upload", "close_after_last")
"""Seconds from a round's start to its uploads, then from the last upload to its close."""


def _epoch(when: Any) -> float:
    """A stored timestamp (naive ones are UTC) as seconds since the epoch."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return float(when.timestamp())


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


@contextlib.contextmanager
def fresh_schema(db_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose tables live in a new schema, dropped afterwards.

    Every count starts from an empty store: workers of an earlier run (the same
    names, heard less than a liveness timeout ago) otherwise count as alive, become
    participants, never answer, and hold round 1 until they time out. Nothing
    outside the new schema is touched. SQLite (an empty URL) gets a new file anyway."""
    if not db_url:
        yield db_url
        return
    from sqlalchemy import create_engine, make_url, text

    schema = f"bench_load_{uuid.uuid4().hex[:12]}"
    admin = create_engine(db_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(db_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def measure(workers: int, config: LoadConfig) -> dict[str, Any]:
    with fresh_schema(config.database_url or os.environ.get("FEDPILOT_DATABASE_URL", "")) as url:
        return _measure(workers, config, url)


def _measure(workers: int, config: LoadConfig, db_url: str) -> dict[str, Any]:
    from fedpilot.cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        sized = _sized_for(workers)
        cluster = LocalCluster(work / "cluster", db_url=db_url, log_level="warning", env=sized)
        procs: list[subprocess.Popen[bytes]] = []
        outputs: list[Path] = []
        sampler = CpuSampler(0, [])
        try:
            address = cluster.start_coordinator(evaluate=False)
            pid = cluster.processes["coordinator"].pid
            per = max(1, min(config.workers_per_process, math.ceil(workers / 4)))
            for first in range(0, workers, per):
                out = work / f"load-{first}.json"
                outputs.append(out)
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "fedpilot.bench.load",
                            address,
                            str(first),
                            str(min(per, workers - first)),
                            json.dumps(asdict(config)),
                            str(out),
                        ],
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + config.timeout_s
            while len(list(work.glob("ready-*"))) < len(procs):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("simulated worker processes did not start")
                time.sleep(0.05)
            store = cluster.store
            cpu_before = _cpu_seconds(pid)
            sampler = CpuSampler(pid, [p.pid for p in procs]).start()
            (work / "go").touch()
            while len(store.alive_workers(30)) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {len(store.alive_workers(30))} of {workers} workers registered"
                    )
                time.sleep(0.1)
            job_id = store.create_job(
                "bench-load",
                {
                    "rounds": config.rounds,
                    "min_workers": workers,
                    "round_deadline_s": config.timeout_s,
                    "profile_deadline_s": config.timeout_s,
                    "quorum": 1.0,
                    "ig_probe_batches": 0,
                    # The synthetic adapter's LoRA shapes, which the coordinator checks.
                    "lora": {"rank": config.rank, "target_modules": _targets(2)},
                },
            )
            while (job := store.job(job_id)) is not None and job.state not in (
                "done",
                "failed",
                "cancelled",
            ):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert job is not None
            cpu = _cpu_seconds(pid) - cpu_before
            peak = _hwm(pid)
            resent = _resent_calls(cluster.http_url)
            rounds = store.rounds(job_id)
            received = [
                sorted(u.received_at for u in store.updates(job_id, r.number)) for r in rounds
            ]
            updates = [len(r) for r in received]
            duplicates_ok = all(n <= workers for n in updates)
        finally:
            sampler.stop()
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            cluster.stop()
        results = [json.loads(o.read_text()) for o in outputs if o.exists()]
        log_file = work / "cluster" / "coordinator.log"
        # The coordinator logs warnings and worse only: what went wrong, kept before the
        # temporary folder goes.
        coordinator_log = (
            log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
        )
    latencies: dict[str, list[float]] = {}
    errors: list[str] = []
    spans: list[tuple[float, float]] = []
    intervals: list[float] = []
    failed_after: dict[str, list[float]] = {}
    for r in results:
        intervals += r["intervals"]
        for name, values in r["failed_after"].items():
            failed_after.setdefault(name, []).extend(values)
        for method, values in r["latencies"].items():
            latencies.setdefault(method, []).extend(values)
        errors += r["errors"]
        spans += [(s + r["clock_offset"], e + r["clock_offset"]) for s, e in r["registered"]]
    every = [v for values in latencies.values() for v in values]
    registration_s = max(e for _, e in spans) - min(s for s, _ in spans) if spans else 0.0
    closes = [
        (r.closed_at - r.started_at).total_seconds() for r in rounds if r.closed_at is not None
    ]
    windows = [
        (_epoch(r.started_at), _epoch(r.closed_at)) for r in rounds if r.closed_at is not None
    ]
    # Where a round's time goes: until the last upload is the fleet's and the calls',
    # after it the driver's (aggregating and writing the next version).
    phases = [
        (
            *(
                round((at - r.started_at).total_seconds(), 3)
                for at in (times[0], times[len(times) // 2], times[-max(1, len(times) // 10)])
            ),
            round((times[-1] - r.started_at).total_seconds(), 3),
            round((r.closed_at - times[-1]).total_seconds(), 3),
        )
        for r, times in zip(rounds, received, strict=True)
        if r.closed_at is not None and times
    ]
    if job.state != "done":
        errors.append(f"job ended {job.state}: {job.error}")
    if len(results) < len(procs):
        errors.append(f"{len(procs) - len(results)} worker processes reported nothing")
    return {
        "bench": "load",
        "workers": workers,
        "registrations_per_s": round(len(spans) / registration_s, 1) if registration_s else 0.0,
        "round_close_s": round(float(np.mean(closes)), 3) if closes else None,
        "rpc_p50_ms": round(_percentile(every, 50) * 1000, 2),
        "rpc_p99_ms": round(_percentile(every, 99) * 1000, 2),
        "coordinator_peak_rss_bytes": peak,
        "coordinator_cpu_s": round(cpu, 2),
        "per_round": round_cpu(sampler, windows),
        "round_phases_s": [dict(zip(_PHASES, p, strict=True)) for p in phases],
        "errors": len(errors),
        "rounds_closed": len(closes),
        "updates_per_round": updates,
        "no_update_counted_twice": duplicates_ok,
        "rpcs": len(every),
        "heartbeats": len(latencies.get("Heartbeat", [])),
        "heartbeat_interval_s": round(float(np.median(intervals)), 2) if intervals else None,
        "by_method_p99_ms": {
            m: round(_percentile(v, 99) * 1000, 2) for m, v in sorted(latencies.items())
        },
        "database": "postgresql" if db_url else "sqlite",
        "coordinator_settings": sized,
        "resent_calls": sum(resent.values()),
        "resent_by_call": resent,
        "errors_by_call": dict(Counter(e.split(":", 1)[0] for e in errors).most_common()),
        "error_samples": errors[:5],
        "failed_after_s": {
            name: {
                "p10": round(_percentile(v, 10), 2),
                "p50": round(_percentile(v, 50), 2),
                "p90": round(_percentile(v, 90), 2),
            }
            for name, v in sorted(failed_after.items())
        },
        "error_details": [d for r in results for d in r["debug"][:2]][:8],
        "job": {"state": job.state, "error": job.error},
        "coordinator_log_lines": len(coordinator_log),
        "coordinator_log_first": coordinator_log[:30],
    }


def _resent_calls(http_url: str) -> dict[str, int]:
    """``fedpilot_resent_calls_total`` by method, from the coordinator's /metrics: calls
    its gRPC core shed unhandled and the workers' channels sent again (not errors: each
    was answered or, after its last attempt, counted among the errors)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    if not http_url:
        return {}
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        sample.labels["method"]: int(sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == "fedpilot_resent_calls"
        for sample in family.samples
        if sample.name == "fedpilot_resent_calls_total"
    }


def _sized_for(workers: int) -> dict[str, str]:
    """The coordinator's gRPC limit as docs/configuration.md sizes it for a fleet: calls
    in progress for each worker's poll, heartbeat and transfer (the default below 500).
    Waiting polls hold no thread, so the thread count is left at its default."""
    return {"FEDPILOT_GRPC_MAX_CONCURRENT_RPCS": str(max(2048, 4 * workers))}


def run(counts: tuple[int, ...], config: LoadConfig) -> Iterator[dict[str, Any]]:
    for n in counts:
        yield measure(n, config)


if __name__ == "__main__":
    _address, _first, _count, _config, _out = sys.argv[1:6]
    serve(_address, int(_first), int(_count), LoadConfig(**json.loads(_config)), Path(_out))


def _targets(count: int) -> list[str]:
    """The LoRA target names of the synthetic encoder's first ``count`` targets."""
    from fedpilot.bench.synthetic import TARGETS

    return list(TARGETS)[:count]
