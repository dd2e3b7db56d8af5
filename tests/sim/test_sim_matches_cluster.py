"""The simulator and a real cluster, same job and seed: the same global adapter."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.aggregation import unflatten
from fedpilot.core.memory import memory_from_json
from fedpilot.demo import tier_budgets
from fedpilot.sim import ModelCache, SimOptions, Simulation, VirtualClient
from fedpilot.wire.payload import decode_tensors
from fedpilot.worker.data import synthetic_dataset

LABELS = ["class0", "class1", "class2"]


def _spec(tiny_dir: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "same-bits",
            "model": str(tiny_dir),
            "labels": LABELS,
            "rounds": 2,
            "min_workers": 3,
            "local_steps": 4,
            "batch_size": 4,
            "max_seq_len": 16,
            "learning_rate": 0.02,
            "round_deadline_s": 120,
            "lora": {"rank": 4, "alpha": 8},
            "ig_probe_batches": 1,
            "seed": 7,
        }
    )


def _wait_done(cluster: LocalCluster, job_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.store.job(job_id)
        assert job is not None
        if job.state in ("done", "failed"):
            assert job.state == "done", job.error
            return
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, (cluster.work_dir / f"{name}.log").read_text()[-3000:]
        time.sleep(0.5)
    raise AssertionError((cluster.work_dir / "coordinator.log").read_text()[-4000:])


def test_two_rounds_of_three_clients_give_the_same_adapter_in_sim_and_cluster(
    tmp_path: Path, tiny_dir: Path, pg_url: str
) -> None:
    # Prepare: three clients with their own data, budgets in the 25/50/100% tiers
    spec = _spec(tiny_dir)
    files = []
    for i in range(3):
        data = synthetic_dataset(24 + 8 * i, len(LABELS), seed=i)
        files.append(
            write_csv(tmp_path / f"w{i}.csv", data.texts, [LABELS[y] for y in data.labels])
        )
    cache = ModelCache()
    measured, _ = cache.profile(spec)
    budgets = tier_budgets(measured, 3)

    # Execute: the real cluster (gRPC, PostgreSQL, one process per worker) ...
    started = time.perf_counter()
    with LocalCluster(tmp_path / "cluster", db_url=pg_url, log_level="warning") as cluster:
        cluster.start_coordinator(evaluate=False)
        for i, (path, budget) in enumerate(zip(files, budgets, strict=True)):
            cluster.start_worker(f"w{i}", path, budget, threads=1)
        job_id = cluster.store.create_job(spec.name, spec.model_dump(mode="json"))
        _wait_done(cluster, job_id, timeout_s=600)
        cluster_seconds = time.perf_counter() - started
        store = cluster.store
        version = store.latest_version(job_id)
        assert version is not None and version.version == 2
        blobs = BlobStore(cluster.data_dir / "blobs")
        cluster_adapter = unflatten(decode_tensors(blobs.read(version.sha256)))
        profiles = store.profiles(job_id)
        memory = memory_from_json(next(iter(profiles.values())).memory)
        trained = {
            (t.round, t.worker_id): list(t.modules)
            for r in (1, 2)
            for t in store.tasks(job_id, r, "train")
        }
        names = {w.id: w.name for w in store.workers()}
        budget_of = {w.id: w.budget_bytes for w in store.workers()}
        peaks = [
            (t.predicted_bytes, u.measured_peak_bytes, budget_of[u.worker_id])
            for r in (1, 2)
            for u in store.updates(job_id, r)
            for t in store.tasks(job_id, r, "train")
            if t.worker_id == u.worker_id
        ]

    # ... and the simulator, with the memory profile the workers reported
    torch.set_num_threads(1)
    clients = [
        VirtualClient(f"w{i}", f, b) for i, (f, b) in enumerate(zip(files, budgets, strict=True))
    ]
    started = time.perf_counter()
    result = Simulation(
        spec, clients, cache=cache, memory=memory, options=SimOptions(measure_peak=True)
    ).run()
    sim_seconds = time.perf_counter() - started
    print(f"cluster {cluster_seconds:.1f} s, simulator {sim_seconds:.1f} s")

    # Assert: same assignments, and the same global adapter within 1e-6
    sim_trained = {
        (r.number, name): modules for r in result.rounds for name, modules in r.modules.items()
    }
    assert {(n, names[w]): m for (n, w), m in trained.items()} == sim_trained
    assert len({len(m) for m in sim_trained.values()}) > 1  # tiers really differ
    assert cluster_adapter.keys() == result.adapter.keys()
    moved = 0.0
    for module, parts in cluster_adapter.items():
        for part, x in parts.items():
            np.testing.assert_allclose(result.adapter[module][part], x, rtol=0, atol=1e-6)
            moved = max(moved, float(np.abs(x).max()))
    assert moved > 0
    # and no memory-budget violation, predicted or measured, in the cluster run
    assert len(peaks) == len(trained)
    assert all(
        predicted <= budget and 0 < measured <= budget for predicted, measured, budget in peaks
    )
