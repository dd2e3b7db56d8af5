"""`fedpilot bench round`: what one round costs the system itself.

The real coordinator (gRPC service, round driver, store, blob directory) runs
in this process; N simulated workers run in a few subprocesses, one thread
each, and speak the real protocol through
:class:`fedpilot.worker.client.CoordinatorClient`: register, heartbeat,
long-poll, report a profile, download the global adapter (verified), upload
an update of exactly the assigned modules (real float32 tensors), poll
again. They skip training (or sleep ``compute_s`` in its place), so what is
left of a round is overhead: assignment, aggregation, database, transfer and
the driver's polling.

Timings come from wrapping, in this process only, the public methods of the
coordinator's ``Store`` and the phases of its ``RoundDriver`` with a clock;
the coordinator's code is unchanged. A round ``r`` runs from the commit of
version ``r - 1`` to the commit of version ``r``, and splits into parts that
add up to it exactly:

- ``assign_s``: ``RoundDriver._assign`` minus the database calls inside it
  (scores, the knapsack of every worker, building tasks);
- ``aggregate_s``: ``RoundDriver._aggregating`` minus its database calls
  (reading blobs, STAgg, encoding and writing the new version);
- ``db_s``: every database call of the driver thread outside the transfer
  window (reads when ticking, the commit of tasks and of the version);
- ``transfer_s``: from the tasks' commit to the last update's row, minus the
  slowest worker's compute: polls, downloads, uploads and their checks,
  fsyncs and rows, with the workers' own CPU time on a shared machine;
- ``idle_s``: the rest, the driver sleeping between ticks.

Round 1 also profiles, so only rounds 2.. are measured.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SIM_NAME = "sim"
DRIVER_THREAD = "round-driver"


@dataclass(frozen=True)
class RoundConfig:
    rounds: int = 3
    """Rounds per job; round 1 profiles and is not measured."""
    layers: int = 12
    targets: int = 2
    """LoRA targets per layer of the BERT-base-like encoder (rank 8, hidden 768)."""
    rank: int = 8
    poll_wait_ms: int = 5_000
    """The simulated workers' long-poll wait (the real worker's default)."""
    compute_s: float = 0.0
    """Seconds each simulated worker sleeps in place of training."""
    workers_per_process: int = 125
    timeout_s: float = 900.0
    """Give up on one worker count after this long."""
    database_url: str = ""


# -- the clock around the coordinator -----------------------------------------------------


@dataclass
class Clock:
    """Spans recorded by the wrapped store and driver methods (thread-safe appends)."""

    db: list[tuple[str, str, float, float]] = field(default_factory=list)
    """(thread name, method, start, end) of every store call."""
    phases: list[tuple[str, int, float, float]] = field(default_factory=list)
    """(phase, round, start, end) of the driver's steps."""
    uploads: dict[int, float] = field(default_factory=dict)
    """round -> end of the last ``record_update``."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """Wrap Store's public methods and RoundDriver's phases with ``clock``; undo on exit."""
    from fedpilot.coordinator.db.store import Store
    from fedpilot.coordinator.rounds import RoundDriver

    saved: list[tuple[type, str, Any]] = []

    def wrap_store(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with clock.lock:
                    clock.db.append((threading.current_thread().name, name, start, end))
                    if name == "record_update" and len(args) > 1:
                        number = int(args[1].round)
                        clock.uploads[number] = max(clock.uploads.get(number, 0.0), end)

        return timed

    def wrap_phase(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(self: Any, job: Any, spec: Any, *rest: Any) -> Any:
            number = int(rest[0]) if rest else int(job.current_round)
            start = time.perf_counter()
            try:
                return fn(self, job, spec, *rest)
            finally:
                with clock.lock:
                    clock.phases.append((name, number, start, time.perf_counter()))

        return timed

    for name, fn in list(vars(Store).items()):
        if callable(fn) and not name.startswith("_") and name not in ("open", "session"):
            saved.append((Store, name, fn))
            setattr(Store, name, wrap_store(name, fn))
    for name in ("_assign", "_aggregating"):
        fn = vars(RoundDriver)[name]
        saved.append((RoundDriver, name, fn))
        setattr(RoundDriver, name, wrap_phase(name.strip("_"), fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _overlap(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in spans)


def breakdown(clock: Clock, number: int, compute_s: float) -> dict[str, float]:
    """Split round ``number`` (from version ``number - 1``'s commit to its own)."""
    phases = {(p, r): (s, e) for p, r, s, e in clock.phases}
    _, prev_end = phases[("aggregating", number - 1)]
    a_start, a_end = phases[("assign", number)]
    g_start, g_end = phases[("aggregating", number)]
    last_upload = clock.uploads[number]
    driver = [(s, e) for t, _, s, e in clock.db if t == DRIVER_THREAD and prev_end <= s < g_end]
    service = [(s, e) for t, _, s, e in clock.db if t != DRIVER_THREAD and a_end <= s < last_upload]
    round_s = g_end - prev_end
    db_assign = _overlap(driver, a_start, a_end)
    db_aggregate = _overlap(driver, g_start, g_end)
    window = last_upload - a_end
    db_s = _overlap(driver, prev_end, g_end) - _overlap(driver, a_end, last_upload)
    assign_s = (a_end - a_start) - db_assign
    aggregate_s = (g_end - g_start) - db_aggregate
    transfer_s = max(0.0, window - compute_s)
    idle_s = round_s - assign_s - aggregate_s - db_s - transfer_s - min(compute_s, window)
    return {
        "round_s": round_s,
        "overhead_s": round_s - compute_s,
        "assign_s": assign_s,
        "aggregate_s": aggregate_s,
        "db_s": db_s,
        "transfer_s": transfer_s,
        "idle_s": max(0.0, idle_s),
        "service_db_s": sum(e - s for s, e in service),
        "service_db_calls": len(service),
        "driver_db_calls": len(driver),
    }


# -- simulated workers (a subprocess: `python -m fedpilot.bench.round ADDRESS FIRST COUNT ...`) --


def _memory(config: RoundConfig) -> Any:
    from fedpilot.bench.synthetic import encoder_memory

    return encoder_memory(layers=config.layers, rank=config.rank, targets=config.targets)


def _profile_message(config: RoundConfig, budget: int) -> Any:
    from fedpilot.bench.synthetic import lora_update
    from fedpilot.core.aggregation import flatten
    from fedpilot.v1 import profile_pb2
    from fedpilot.wire.payload import tensor_specs
    from fedpilot.wire.serde import memory_to_proto

    memory = _memory(config)
    shapes = flatten(lora_update(memory, config.rank, seed=0))
    return memory_to_proto(
        memory,
        budget,
        method=profile_pb2.PROFILE_METHOD_SAVED_TENSORS,
        device="cpu",
        tensors=tensor_specs(shapes),
    )


def simulated_update(
    task: Any, adapter: dict[str, np.ndarray], rng: np.random.Generator, train_seconds: float = 0
) -> tuple[Any, dict[str, np.ndarray]]:
    """What a worker that skipped training uploads: the assigned modules of the adapter,
    slightly perturbed (real float32 tensors), with a manifest as a real worker fills it."""
    from fedpilot.core.aggregation import SEPARATOR
    from fedpilot.v1 import transfer_pb2

    assigned = set(task.modules)
    update = {
        k: v + rng.standard_normal(v.shape, dtype=np.float32) * np.float32(1e-3)
        for k, v in adapter.items()
        if k.rpartition(SEPARATOR)[0] in assigned
    }
    manifest = transfer_pb2.UpdateManifest(
        job_id=task.job_id,
        round=task.round,
        task_id=task.task_id,
        base_version=task.adapter_version,
        num_samples=100,
        train_loss_before=1.0,
        train_loss_after=0.9,
        local_scores={m: float(rng.random()) for m in assigned},
        predicted_peak_bytes=task.predicted_peak_bytes,
        train_seconds=train_seconds,
    )
    return manifest, update


def _simulated_worker(
    address: str,
    index: int,
    budget: int,
    config: RoundConfig,
    stop: threading.Event,
    clients: list[Any],
    errors: list[str],
) -> None:
    import grpc

    from fedpilot.v1 import coordinator_pb2
    from fedpilot.worker.client import CoordinatorClient

    client = CoordinatorClient(address, timeout_s=600)
    profile = _profile_message(config, budget)
    rng = np.random.default_rng(index)
    while not stop.is_set():
        try:
            if not client.worker_id:
                client.register(f"{SIM_NAME}{index}", budget_bytes=budget)
                clients.append(client)
            task = client.poll_task(config.poll_wait_ms)
            if task is None:
                continue
            if task.kind == coordinator_pb2.TASK_KIND_PROFILE:
                client.report_profile(task.job_id, task.task_id, profile)
                continue
            _, adapter = client.adapter_for(task)
            if config.compute_s:
                time.sleep(config.compute_s)
            client.upload_update(*simulated_update(task, adapter, rng, config.compute_s))
        except grpc.RpcError as e:
            errors.append(f"{index}: {e.code()}")  # type: ignore[attr-defined]
            if stop.wait(0.5):
                break


def _heartbeats(clients: list[Any], stop: threading.Event) -> None:
    while not stop.wait(2.0):
        for client in list(clients):
            with contextlib.suppress(Exception):
                client.heartbeat()


def serve_workers(
    address: str, first: int, count: int, budgets: list[int], config: RoundConfig
) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    clients: list[Any] = []
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_simulated_worker,
            args=(address, first + i, budgets[i], config, stop, clients, errors),
            daemon=True,
        )
        for i in range(count)
    ]
    threads.append(threading.Thread(target=_heartbeats, args=(clients, stop), daemon=True))
    for t in threads:
        t.start()
    while not stop.wait(1.0):
        pass
    if errors:
        print(f"{len(errors)} RPC errors, e.g. {errors[:3]}", file=sys.stderr)


# -- one worker count --------------------------------------------------------------------


def measure(workers: int, config: RoundConfig) -> dict[str, Any]:
    import json

    from fedpilot.bench.synthetic import tiered_budgets
    from fedpilot.coordinator import server
    from fedpilot.coordinator.settings import CoordinatorSettings

    clock = Clock()
    budgets = tiered_budgets(_memory(config), workers, seed=0)
    with (
        tempfile.TemporaryDirectory(prefix="bench-round-", ignore_cleanup_errors=True) as tmp,
        instrumented(clock),
    ):
        settings = CoordinatorSettings(
            data_dir=Path(tmp) / "coordinator",
            database_url=config.database_url or os.environ.get("FEDPILOT_DATABASE_URL", ""),
            grpc_port=0,
        )
        running = server.start(settings)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            address = f"127.0.0.1:{running.port}"
            per = max(1, min(config.workers_per_process, math.ceil(workers / 4)))
            for first in range(0, workers, per):
                count = min(per, workers - first)
                cfg = json.dumps({**config.__dict__, "database_url": ""})
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "fedpilot.bench.round",
                            address,
                            str(first),
                            str(count),
                            json.dumps(budgets[first : first + count]),
                            cfg,
                        ],
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                        start_new_session=True,
                    )
                )
            store = running.store
            _wait_alive(store, workers, settings.heartbeat_timeout_s, config.timeout_s, procs)
            job_id = store.create_job(
                "bench-round",
                {
                    "rounds": config.rounds,
                    "min_workers": workers,
                    "round_deadline_s": config.timeout_s,
                    "quorum": 1.0,
                    "ig_probe_batches": 0,
                    # The synthetic adapter's LoRA shapes, which the coordinator checks.
                    "lora": {"rank": config.rank, "target_modules": _targets(config.targets)},
                    "seed": 0,
                },
            )
            start = time.monotonic()
            started, stalled = None, None
            while True:
                job = store.job(job_id)
                assert job is not None
                if started is None and job.current_round >= 1:
                    started = time.monotonic() - start
                if job.state in ("done", "failed", "cancelled"):
                    break
                for p in procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"a simulated worker process exited ({p.returncode})")
                if time.monotonic() - start > config.timeout_s:
                    break
                time.sleep(0.2)
            if job.state not in ("done", "failed", "cancelled"):
                stalled = _stalled(store, job, workers, settings.heartbeat_timeout_s, config)
            elif job.state != "done":
                raise RuntimeError(f"{workers} workers: job {job.state}: {job.error}")
            updates = [len(store.updates(job_id, r)) for r in range(1, config.rounds + 1)]
            sizes = [u.byte_count for u in store.updates(job_id, config.rounds)]
            adapter = store.latest_version(job_id)
            modules = [len(t.modules) for t in store.tasks(job_id, config.rounds, "train")]
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            running.stop()
    if stalled is not None:
        return stalled
    parts = [breakdown(clock, r, config.compute_s) for r in range(2, config.rounds + 1)]
    mean = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
    round_s = mean["round_s"]
    return {
        "bench": "round",
        "workers": workers,
        "rounds_measured": len(parts),
        "round_s": round(round_s, 3),
        "overhead_s": round(mean["overhead_s"], 3),
        "overhead_share": round(mean["overhead_s"] / round_s, 3) if round_s else 0.0,
        "compute_s": config.compute_s,
        **{
            k: round(mean[k], 3)
            for k in ("assign_s", "aggregate_s", "db_s", "transfer_s", "idle_s")
        },
        **{
            f"{k.removesuffix('_s')}_share": round(mean[k] / round_s, 3) if round_s else 0.0
            for k in ("assign_s", "aggregate_s", "db_s", "transfer_s", "idle_s")
        },
        "service_db_s": round(mean["service_db_s"], 3),
        "service_db_calls": int(mean["service_db_calls"]),
        "driver_db_calls": int(mean["driver_db_calls"]),
        "updates_per_round": updates,
        "mean_modules": round(float(np.mean(modules)), 2) if modules else 0.0,
        "adapter_bytes": adapter.byte_count if adapter else 0,
        "mean_update_bytes": int(np.mean(sizes)) if sizes else 0,
        "poll_wait_ms": config.poll_wait_ms,
        "database": "postgresql"
        if (config.database_url or os.environ.get("FEDPILOT_DATABASE_URL"))
        else "sqlite",
        "first_round_start_s": round(started or 0.0, 2),
    }


def _stalled(
    store: Any, job: Any, workers: int, heartbeat_s: float, config: RoundConfig
) -> dict[str, Any]:
    """What a job that did not finish in time got to: the row reports it instead of timings."""
    number = job.current_round
    tasks = store.tasks(job.id, number)
    return {
        "bench": "round",
        "workers": workers,
        "error": f"not done after {config.timeout_s:.0f} s",
        "state": job.state,
        "round": number,
        "rounds_closed": sum(r.closed_at is not None for r in store.rounds(job.id)),
        "tasks": {s: sum(t.status == s for t in tasks) for s in sorted({t.status for t in tasks})},
        "updates_in_round": len(store.updates(job.id, number)),
        "alive_workers": len(store.alive_workers(heartbeat_s)),
        "registered_workers": len(store.workers()),
        "poll_wait_ms": config.poll_wait_ms,
    }


def _wait_alive(
    store: Any, workers: int, heartbeat_s: float, timeout_s: float, procs: list[Any]
) -> None:
    """Until exactly ``workers`` simulated workers are alive (all registered; none stale)."""
    deadline = time.monotonic() + timeout_s
    while len(store.alive_workers(heartbeat_s)) != workers:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a simulated worker process exited while starting")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{workers} simulated workers not alive together after {timeout_s:.0f} s: "
                f"{len(store.workers())} registered, "
                f"{len(store.alive_workers(heartbeat_s))} alive"
            )
        time.sleep(0.2)


def run(workers: tuple[int, ...], config: RoundConfig) -> Iterator[dict[str, Any]]:
    for n in workers:
        yield measure(n, config)


if __name__ == "__main__":
    import json

    address, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    budgets = [int(b) for b in json.loads(sys.argv[4])]
    serve_workers(address, first, count, budgets, RoundConfig(**json.loads(sys.argv[5])))


def _targets(count: int) -> list[str]:
    """The LoRA target names of the synthetic encoder's first ``count`` targets."""
    from fedpilot.bench.synthetic import TARGETS

    return list(TARGETS)[:count]
