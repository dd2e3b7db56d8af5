"""SIGKILL the coordinator mid-job, restart it on the same PostgreSQL database: the job
finishes with every round once, no update counted twice, and an unbroken checksum chain."""

from __future__ import annotations

import json
import signal
import time
from itertools import pairwise
from pathlib import Path

from fedpilot.cluster import LocalCluster
from tests.test_cluster import LABELS, _csv, wait_for


def _wait_round_state(
    cluster: LocalCluster, job_id: str, number: int, state: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = cluster.store.job(job_id)
        if job is not None and job.current_round >= number and job.state == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"round {number} never reached {state}")


def test_coordinator_killed_mid_round_resumes_on_postgres(
    tmp_path: Path, tiny_dir: Path, pg_url: str
) -> None:
    # Prepare: a 3-round job on PostgreSQL; generous budgets (this test is about crashes).
    spec = {
        "name": "crash",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": 3,
        "min_workers": 2,
        "local_steps": 6,
        "batch_size": 8,
        "max_seq_len": 16,
        "learning_rate": 0.01,
        "round_deadline_s": 120,
        "lora": {"rank": 4, "alpha": 8},
        "ig_probe_batches": 1,
    }
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(spec))
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        address = cluster.start_coordinator(job=job_file, evaluate=False)
        port = int(address.rsplit(":", 1)[1])
        for name, seed in (("a", 1), ("b", 2)):
            cluster.start_worker(name, _csv(tmp_path / f"{name}.csv", 80, seed), 10**10)
        (job,) = cluster.store.jobs()

        # Execute: crash while round 2 is training, restart on the same port and database.
        _wait_round_state(cluster, job.id, 2, "training", timeout_s=180)
        cluster.kill("coordinator", signal.SIGKILL)
        time.sleep(2)  # workers see the coordinator gone and back off
        cluster.start_coordinator(evaluate=False, port=port)
        job = wait_for(cluster, job.id, {"done", "failed"}, timeout_s=300)

        # Assert
        assert job.state == "done", job.error
        store = cluster.store
        versions = store.versions(job.id)
        assert [v.version for v in versions] == [0, 1, 2, 3]
        assert all(v.parent_sha256 == p.sha256 for p, v in pairwise(versions))
        for number in (1, 2, 3):
            updates = store.updates(job.id, number)
            workers = [u.worker_id for u in updates]
            assert len(workers) == len(set(workers)) >= 1
            assert store.round(job.id, number).state == "closed"
        assert len(store.jobs()) == 1  # the restart submitted nothing new
