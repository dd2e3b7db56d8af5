"""A real federated run: coordinator and workers as processes, gRPC over loopback."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import pytest

from fedpilot.cluster import LocalCluster, write_csv
from fedpilot.coordinator.db.models import Job
from fedpilot.worker.data import synthetic_dataset
from fedpilot.worker.model import ModelSpec, load_model
from fedpilot.worker.profiling import dummy_batch, profile_memory

LABELS = ["class0", "class1", "class2"]


def _csv(path: Path, n: int, seed: int) -> Path:
    data = synthetic_dataset(n, len(LABELS), seed=seed)
    return write_csv(path, data.texts, [LABELS[y] for y in data.labels])


def wait_for(cluster: LocalCluster, job_id: str, states: set[str], timeout_s: float) -> Job:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.store.job(job_id)
        if job is not None and job.state in states:
            return job
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, (
                f"{name} exited: {(cluster.work_dir / (name + '.log')).read_text()[-3000:]}"
            )
        time.sleep(0.5)
    logs = (cluster.work_dir / "coordinator.log").read_text()[-4000:]
    raise AssertionError(f"job not in {states} after {timeout_s}s; coordinator log:\n{logs}")


@pytest.fixture()
def job_file(tmp_path: Path, tiny_dir: Path) -> Path:
    spec = {
        "name": "e2e",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": 2,
        "min_workers": 2,
        "local_steps": 8,
        "batch_size": 8,
        "max_seq_len": 16,
        "learning_rate": 0.01,
        "round_deadline_s": 90,
        "lora": {"rank": 4, "alpha": 8},
        "ig_probe_batches": 1,
        "eval_dataset": str(_csv(tmp_path / "eval.csv", 90, seed=9)),
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def test_federated_run_across_processes_with_uneven_budgets(tmp_path, tiny_dir, job_file) -> None:
    # Prepare: budgets from a profile of the same configuration, one worker fitting only
    # the top of the model, the other everything.
    spec = ModelSpec(
        model_path=str(tiny_dir),
        num_labels=3,
        lora_rank=4,
        lora_alpha=8,
        max_seq_len=16,
        batch_size=8,
    )
    model = load_model(spec)
    memory = profile_memory(model, dummy_batch(model, 8, 16))
    top = [m.name for m in memory.modules if m.layer in (0, memory.num_layers)]
    small, large = int(memory.cost(top) * 1.10), int(memory.full_cost() * 1.5)

    with LocalCluster(tmp_path / "cluster") as cluster:
        # Execute
        cluster.start_coordinator(job=job_file)
        cluster.start_worker("small", _csv(tmp_path / "a.csv", 120, seed=1), small)
        cluster.start_worker("large", _csv(tmp_path / "b.csv", 120, seed=2), large)
        (job,) = cluster.store.jobs()
        job = wait_for(cluster, job.id, {"done", "failed"}, timeout_s=240)

        # Assert
        assert job.state == "done", job.error
        store = cluster.store
        versions = store.versions(job.id)
        assert [v.version for v in versions] == [0, 1, 2]
        assert all(v.parent_sha256 == p.sha256 for p, v in pairwise(versions))
        workers = {w.id: w.name for w in store.workers()}
        for number in (1, 2):
            rnd = store.round(job.id, number)
            assert rnd.state == "closed" and rnd.closed_at is not None
            updates = store.updates(job.id, number)
            assert sorted(workers[u.worker_id] for u in updates) == ["large", "small"]
            tasks = {workers[t.worker_id]: t for t in store.tasks(job.id, number, "train")}
            assert len(tasks["small"].modules) < len(tasks["large"].modules)
            assert tasks["small"].predicted_bytes <= small
            assert "eval_accuracy" in rnd.metrics
        first = store.round(job.id, 1).metrics
        assert first["train_loss_after"] < first["train_loss_before"]
        assert store.module_stats(job.id)  # global scores were updated
