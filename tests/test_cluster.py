"""A real federated run: coordinator and workers as processes, gRPC over loopback."""

from __future__ import annotations

import json
import socket
import time
from itertools import pairwise
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
        metrics_port = _free_port()
        cluster.start_worker(
            "small", _csv(tmp_path / "a.csv", 120, seed=1), small, metrics_port=metrics_port
        )
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

        # The operator's view of the same run: REST round detail and Prometheus metrics.
        _check_rest_view(cluster.http_url, job.id, small, large)
        _check_metrics(cluster.http_url, job.id)
        _check_worker_metrics(f"http://127.0.0.1:{metrics_port}", small)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _check_worker_metrics(url: str, budget: int) -> None:
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in f.samples
    }
    assert samples[("fedpilot_worker_memory_budget_bytes", ())] == budget
    assert samples[("fedpilot_worker_tasks_total", (("kind", "train"), ("outcome", "done")))] == 2
    assert samples[("fedpilot_worker_train_steps_total", ())] == 2 * 8  # local_steps per round
    assert samples[("fedpilot_worker_train_samples_per_second", ())] > 0
    assert 0 < samples[("fedpilot_worker_measured_peak_bytes", ())] <= budget
    assert samples[("fedpilot_worker_upload_bytes_total", ())] > 0
    assert samples[("fedpilot_worker_connected", ())] == 1


def _check_rest_view(url: str, job_id: str, small: int, large: int) -> None:
    detail = httpx.get(f"{url}/api/v1/jobs/{job_id}").json()
    assert detail["state"] == "done" and len(detail["history"]) == 2
    assert all(r["eval_accuracy"] is not None for r in detail["history"])
    assert detail["modules"] and detail["adapter_version"] == 2
    rnd = httpx.get(f"{url}/api/v1/jobs/{job_id}/rounds/1").json()
    train = {a["worker_name"]: a for a in rnd["assignments"] if a["kind"] == "train"}
    assert set(train) == {"small", "large"}
    assert train["small"]["budget_bytes"] == small and train["large"]["budget_bytes"] == large
    for a in train.values():
        assert a["status"] == "done" and a["modules"]
        assert 0 < a["predicted_bytes"] <= a["budget_bytes"]
        assert a["measured_peak_bytes"] > 0 and a["upload_bytes"] > 0
    assert rnd["bytes_moved"] > 0 and rnd["straggler_ids"] == []
    workers = httpx.get(f"{url}/api/v1/workers").json()
    assert {w["name"] for w in workers} == {"small", "large"}
    assert all(w["last_profile"]["job_id"] == job_id for w in workers)


def _check_metrics(url: str, job_id: str) -> None:
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: f for name, f in families.items() if name.startswith("fedpilot_")}

    def value(name: str, suffix: str = "", **labels: str) -> float:
        return sum(
            s.value
            for s in ours[name].samples
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
        )

    for name, family in ours.items():  # Prometheus conventions
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        if family.type == "histogram":
            assert name.endswith("_seconds"), name
    assert value("fedpilot_rounds", "_total", outcome="closed") == 2
    assert value("fedpilot_uploads", "_total") == 4
    assert value("fedpilot_received_bytes", "_total") > 0
    assert value("fedpilot_sent_bytes", "_total") > 0
    assert value("fedpilot_registrations", "_total") == 2
    assert value("fedpilot_assignment_solve_seconds", "_count") == 2
    assert value("fedpilot_aggregation_seconds", "_count") == 2
    assert value("fedpilot_workers_connected") == 2
    # Per-worker series are labelled by worker id (bounded), never by a chosen name.
    ids = {w["name"]: w["id"] for w in httpx.get(f"{url}/api/v1/workers").json()}
    for name in ("small", "large"):
        assert value("fedpilot_registered_budget_bytes", worker=ids[name]) > 0
        assert value("fedpilot_reported_peak_bytes", worker=ids[name]) > 0
        assert value("fedpilot_registered_budget_bytes", worker=name) == 0
    assert 0 <= value("fedpilot_global_accuracy", job=job_id) <= 1
