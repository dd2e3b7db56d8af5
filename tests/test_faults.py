"""Faults with real processes on real PostgreSQL: a worker killed mid-training, the
coordinator killed mid-upload and mid-aggregation, sampled participants, and workers
riding out a coordinator restart.

Each test runs a coordinator and workers as OS processes (:class:`LocalCluster`) on a
database of its own, then checks the same invariants: the job finishes with every
round once, no update is counted twice, and the adapter versions form an unbroken
checksum chain.

"Mid-upload" and "mid-aggregation" are reached without timing luck: the test holds a
PostgreSQL table lock, so the coordinator blocks inside the transaction that would
record the upload (``updates``) or commit the new version (``adapter_versions``); the
test sees the waiting lock in ``pg_locks`` and kills the coordinator there. "Mid-training"
uses the worker's test-only ``FEDPILOT_FAULT_TRAIN_DELAY_S``, which holds a taken
training task before training.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

from fedpilot.cluster import LocalCluster
from fedpilot.coordinator.db.models import Update
from fedpilot.coordinator.db.store import Store
from tests.test_cluster import LABELS, _csv

pytestmark = pytest.mark.slow

T = TypeVar("T")
BUDGET = 10**10  # every module fits: these tests are about faults, not budgets


# -- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture()
def fast_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coordinator settings (read from the environment its process inherits): frequent
    heartbeats, a dead worker noticed within seconds, quick round-driver ticks."""
    monkeypatch.setenv("FEDPILOT_HEARTBEAT_INTERVAL_MS", "500")
    monkeypatch.setenv("FEDPILOT_HEARTBEAT_TIMEOUT_S", "5")
    monkeypatch.setenv("FEDPILOT_TICK_SECONDS", "0.2")
    monkeypatch.delenv("FEDPILOT_FAULT_TRAIN_DELAY_S", raising=False)


def _job(tmp_path: Path, tiny_dir: Path, **overrides: Any) -> Path:
    spec = {
        "name": "faults",
        "model": str(tiny_dir),
        "labels": LABELS,
        "rounds": 2,
        "min_workers": 2,
        "quorum": 0.5,
        "local_steps": 4,
        "batch_size": 8,
        "max_seq_len": 16,
        "learning_rate": 0.01,
        "round_deadline_s": 60,
        "lora": {"rank": 4, "alpha": 8},
        "ig_probe_batches": 1,
        **overrides,
    }
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    return path


def _logs(cluster: LocalCluster) -> str:
    parts = []
    for log in sorted(cluster.work_dir.glob("*.log")):
        parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-2500:]}")
    return "\n".join(parts)


def _wait(
    cluster: LocalCluster, what: str, check: Callable[[], T | None], timeout_s: float = 120
) -> T:
    """Poll ``check`` until it returns something truthy; every process the cluster still
    lists must stay up meanwhile (a killed one is removed from the list by the test)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        for name, proc in cluster.processes.items():
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{_logs(cluster)}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_logs(cluster)}")
        time.sleep(0.2)


def _kill(cluster: LocalCluster, name: str, sig: int = signal.SIGKILL) -> None:
    cluster.kill(name, sig)
    del cluster.processes[name]


def _job_id(cluster: LocalCluster) -> str:
    (job,) = cluster.store.jobs()
    return job.id


def _done(cluster: LocalCluster, job_id: str, timeout_s: float = 150) -> None:
    job = _wait(
        cluster,
        "the job to end",
        lambda: (
            (j := cluster.store.job(job_id)) is not None
            and j.state in ("done", "failed", "cancelled")
            and j
        ),
        timeout_s,
    )
    assert job.state == "done", f"{job.error}\n{_logs(cluster)}"


def _names(store: Store) -> dict[str, str]:
    return {w.id: w.name for w in store.workers()}


def assert_consistent(store: Store, job_id: str, rounds: int) -> None:
    """Every round once, each update counted once, an unbroken adapter version chain."""
    job = store.job(job_id)
    assert job is not None and job.state == "done" and job.current_round == rounds
    versions = store.versions(job_id)
    assert [v.version for v in versions] == list(range(rounds + 1))
    assert versions[0].parent_sha256 is None
    for parent, child in pairwise(versions):
        assert child.parent_sha256 == parent.sha256, f"version {child.version} breaks the chain"
    total = 0
    for number in range(1, rounds + 1):
        rnd = store.round(job_id, number)
        assert rnd is not None and rnd.state == "closed" and rnd.closed_at is not None
        updates = store.updates(job_id, number)
        workers = [u.worker_id for u in updates]
        assert len(workers) == len(set(workers)) >= 1, f"round {number}: {workers}"
        assert len({u.task_id for u in updates}) == len(updates)
        done = {t.id: t for t in store.tasks(job_id, number, "train") if t.status == "done"}
        assert sorted(done) == sorted(u.task_id for u in updates)
        assert all(done[u.task_id].worker_id == u.worker_id for u in updates)
        assert rnd.metrics["updates"] == len(updates)
        assert rnd.metrics["samples"] == sum(u.num_samples for u in updates)
        assert set(workers) <= set(rnd.participants)
        total += len(updates)
    assert store.count(Update) == total  # nothing stored outside the job's rounds


class TableLock:
    """An EXCLUSIVE lock on one table, held by the test: plain reads go on, and the
    coordinator's next write to the table waits inside its transaction."""

    def __init__(self, url: str, table: str) -> None:
        self.engine = create_engine(url)
        self.table = table
        self.conn: Connection | None = None

    def __enter__(self) -> TableLock:
        self.conn = self.engine.connect()
        self.conn.begin()
        self.conn.execute(text(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE"))
        return self

    def waiters(self) -> list[int]:
        """Backends of this database waiting for a lock on the table."""
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    text(
                        "SELECT pid FROM pg_locks WHERE NOT granted "
                        "AND relation = CAST(:table AS regclass) AND database = "
                        "(SELECT oid FROM pg_database WHERE datname = current_database())"
                    ),
                    {"table": self.table},
                )
            )

    def end_waiters(self) -> None:
        """Terminate the waiting backends of a killed coordinator, so that nothing of its
        transaction can run once the lock is released."""
        pids = self.waiters()
        with self.engine.connect() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            conn.commit()
        deadline = time.monotonic() + 30
        with self.engine.connect() as conn:
            while conn.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": pids},
            ):
                assert time.monotonic() < deadline, f"backends {pids} did not end"
                time.sleep(0.1)
                conn.rollback()

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.rollback()
            self.conn.close()
        self.engine.dispose()


# -- 1. a worker killed mid-training -------------------------------------------------------


def test_worker_killed_mid_training_is_a_straggler_and_rejoins_after_restart(
    tmp_path: Path,
    tiny_dir: Path,
    pg_url: str,
    fast_liveness: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: 3 rounds of 2 workers; a round can close at its deadline with 1 of 2.
    job_file = _job(tmp_path, tiny_dir, rounds=3, round_deadline_s=30, quorum=0.5)
    a_csv, b_csv = _csv(tmp_path / "a.csv", 64, seed=1), _csv(tmp_path / "b.csv", 64, seed=2)
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        job_id = _job_id(cluster)
        cluster.start_worker("a", a_csv, BUDGET)
        monkeypatch.setenv("FEDPILOT_FAULT_TRAIN_DELAY_S", "600")  # b holds its task
        cluster.start_worker("b", b_csv, BUDGET)
        monkeypatch.delenv("FEDPILOT_FAULT_TRAIN_DELAY_S")
        store = cluster.store

        # Execute: SIGKILL b while it holds a training task (normally round 1's; later if
        # its first profile missed the deadline on a busy machine), then start it again.
        def b_training() -> tuple[str, int] | None:
            job = store.job(job_id)
            assert job is not None
            for worker in store.workers():  # one read: a worker may register meanwhile
                if worker.name != "b" or worker.state != "training":
                    continue
                for task in store.tasks(job_id, job.current_round, "train"):
                    if task.id == worker.current_task and task.status == "offered":
                        return worker.id, task.round
            return None

        old_b, number = _wait(cluster, "b to hold a training task", b_training)
        assert number < 3, "b must be able to rejoin a later round"
        _kill(cluster, "b")
        cluster.start_worker("b", b_csv, BUDGET)  # no fault this time; registers anew
        _done(cluster, job_id)

        # Assert: that round closed with a alone, b a straggler (as soon as b's heartbeats
        # stopped, or at the deadline on a machine too busy to notice first); the new b
        # trained in a later round.
        assert_consistent(store, job_id, rounds=3)
        names = _names(store)
        rnd = store.round(job_id, number)
        assert rnd is not None and rnd.deadline_at is not None and rnd.closed_at is not None
        assert rnd.stragglers == [old_b]
        assert [names[u.worker_id] for u in store.updates(job_id, number)] == ["a"]
        (b_task,) = [t for t in store.tasks(job_id, number, "train") if t.worker_id == old_b]
        assert b_task.status == "straggler"
        assert b_task.reason in {"stopped heartbeating", "missed the round deadline"}
        if rnd.closed_at < rnd.deadline_at:
            assert b_task.reason == "stopped heartbeating"
        new_b = {w.id for w in store.workers() if w.name == "b"} - {old_b}
        assert len(new_b) == 1
        later = range(number + 1, 4)
        rejoined = [u for n in later for u in store.updates(job_id, n) if u.worker_id in new_b]
        assert rejoined, f"the restarted b never trained:\n{_logs(cluster)}"
        assert all(u.worker_id != old_b for n in later for u in store.updates(job_id, n))


# -- 2. the coordinator killed mid-upload and mid-aggregation -------------------------------


def test_coordinator_killed_mid_upload_and_mid_aggregation_resumes(
    tmp_path: Path, tiny_dir: Path, pg_url: str, fast_liveness: None
) -> None:
    job_file = _job(tmp_path, tiny_dir, rounds=2)
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        port = int(cluster.start_coordinator(job=job_file, evaluate=False).rsplit(":", 1)[1])
        job_id = _job_id(cluster)
        store = cluster.store

        # Execute 1: uploads of round 1 block on the `updates` lock: SIGKILL there.
        with TableLock(pg_url, "updates") as updates_lock:
            for name, seed in (("a", 1), ("b", 2)):
                cluster.start_worker(name, _csv(tmp_path / f"{name}.csv", 64, seed), BUDGET)
            _wait(cluster, "an upload to wait inside the coordinator", updates_lock.waiters)
            job = store.job(job_id)
            assert job is not None and (job.state, job.current_round) == ("training", 1)
            _kill(cluster, "coordinator")
            updates_lock.end_waiters()
        assert store.updates(job_id, 1) == []  # the interrupted uploads left no row

        # Execute 2: restart; the workers upload again; aggregation blocks on the version
        # commit: SIGKILL there, after the new blob is written and before the commit.
        with TableLock(pg_url, "adapter_versions") as versions_lock:
            cluster.start_coordinator(evaluate=False, port=port)
            _wait(cluster, "the version commit to wait", versions_lock.waiters)
            job = store.job(job_id)
            assert job is not None and (job.state, job.current_round) == ("aggregating", 1)
            assert len(store.updates(job_id, 1)) == 2
            _kill(cluster, "coordinator")
            versions_lock.end_waiters()
        assert store.version(job_id, 1) is None  # the commit did not happen

        # Execute 3: restart again; aggregation is redone from the stored updates.
        cluster.start_coordinator(evaluate=False, port=port)
        _done(cluster, job_id)

        # Assert
        assert_consistent(store, job_id, rounds=2)
        names = _names(store)
        for number in (1, 2):
            assert sorted(names[u.worker_id] for u in store.updates(job_id, number)) == ["a", "b"]
        assert len(store.workers()) == 2  # the workers kept their registrations
        assert len(store.jobs()) == 1  # the restarts submitted nothing new


# -- 3. sampled participants ------------------------------------------------------------------


def test_sampled_participants_each_round(
    tmp_path: Path, tiny_dir: Path, pg_url: str, fast_liveness: None
) -> None:
    # Prepare: 3 workers, half of them (rounded up) sampled: 2 participants a round
    # whether 2 or 3 are alive when the round starts (min_workers is 2).
    job_file = _job(tmp_path, tiny_dir, rounds=3, participation_fraction=0.5)
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        job_id = _job_id(cluster)
        for name, seed in (("a", 1), ("b", 2), ("c", 3)):
            cluster.start_worker(name, _csv(tmp_path / f"{name}.csv", 48, seed), BUDGET)

        # Execute
        _done(cluster, job_id)

        # Assert: 2 participants every round, each with one task and one update.
        store = cluster.store
        assert_consistent(store, job_id, rounds=3)
        for number in (1, 2, 3):
            rnd = store.round(job_id, number)
            assert rnd is not None and len(rnd.participants) == len(set(rnd.participants)) == 2
            tasks = store.tasks(job_id, number, "train")
            assert sorted(t.worker_id for t in tasks) == sorted(rnd.participants)
            assert sorted(u.worker_id for u in store.updates(job_id, number)) == sorted(
                rnd.participants
            )
            assert rnd.stragglers == []
        assert len(store.workers()) == 3


# -- 4. workers ride out a coordinator restart ----------------------------------------------


def test_workers_reconnect_after_a_coordinator_restart(
    tmp_path: Path, tiny_dir: Path, pg_url: str, fast_liveness: None
) -> None:
    job_file = _job(tmp_path, tiny_dir, rounds=3)
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        port = int(cluster.start_coordinator(job=job_file, evaluate=False).rsplit(":", 1)[1])
        job_id = _job_id(cluster)
        workers = {
            name: cluster.start_worker(name, _csv(tmp_path / f"{name}.csv", 48, seed), BUDGET)
            for name, seed in (("a", 1), ("b", 2))
        }
        store = cluster.store

        # Execute: after round 1, stop the coordinator the polite way (SIGTERM); start it
        # again only once both workers have seen it gone and are backing off.
        _wait(cluster, "version 1", lambda: store.version(job_id, 1))
        _kill(cluster, "coordinator", signal.SIGTERM)
        job = store.job(job_id)
        assert job is not None
        stopped_in = job.current_round
        assert stopped_in < 3

        def backing_off() -> bool:
            logs = [(cluster.work_dir / f"{n}.log").read_text(errors="replace") for n in workers]
            return all("coordinator unreachable" in log for log in logs)

        _wait(cluster, "both workers to back off", backing_off, timeout_s=60)
        cluster.start_coordinator(evaluate=False, port=port)
        _done(cluster, job_id)

        # Assert: the same worker processes, with their registrations, trained after the
        # restart.
        assert_consistent(store, job_id, rounds=3)
        for name, proc in workers.items():
            assert cluster.processes[name] is proc and proc.poll() is None
        ids = {w.id for w in store.workers()}
        assert len(ids) == 2
        for number in range(stopped_in + 1, 4):
            assert {u.worker_id for u in store.updates(job_id, number)} == ids
