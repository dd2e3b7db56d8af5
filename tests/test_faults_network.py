"""Faults below the application: the database dropping the coordinator's connections
mid-round, and a worker cut off from the network without its socket being closed.

Same invariants as tests/test_faults.py: every round once, no update counted twice, an
unbroken adapter version chain.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fedpilot.cluster import LocalCluster
from tests.test_cluster import _csv
from tests.test_faults import (
    BUDGET,
    _done,
    _job,
    _logs,
    _names,
    _wait,
    assert_consistent,
    fast_liveness,  # noqa: F401 (fixture)
)

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, tiny_dir: Path, **overrides: object) -> dict[str, object]:
    import json

    return json.loads(_job(tmp_path, tiny_dir, **overrides).read_text())  # type: ignore[no-any-return]


def test_database_connections_killed_mid_round_are_retried(
    tmp_path: Path,
    tiny_dir: Path,
    pg_url: str,
    fast_liveness: None,  # noqa: F811
) -> None:
    # Prepare: 3 rounds of 2 workers on a database of the test's own.
    job_file = _job(tmp_path, tiny_dir, rounds=3, quorum=1.0)
    database = make_url(pg_url).database
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    killed: list[int] = []
    stop = threading.Event()

    def terminate_backends() -> None:
        """What a PostgreSQL restart or a DBA does to the coordinator's connections."""
        while not stop.wait(1.0):
            try:
                with admin.connect() as conn:
                    pids = conn.execute(
                        text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = :db AND pid <> pg_backend_pid()"
                        ),
                        {"db": database},
                    ).fetchall()
                killed.append(len(pids))
            except Exception:  # the killer itself may be refused while others reconnect
                continue

    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        (job,) = cluster.store.jobs()
        cluster.start_worker("a", _csv(tmp_path / "a.csv", 64, seed=1), BUDGET)
        cluster.start_worker("b", _csv(tmp_path / "b.csv", 64, seed=2), BUDGET)

        # Execute: once training has started, kill every connection to the database
        # every second until the job is done.
        _wait(cluster, "round 1", lambda: (j := cluster.store.job(job.id)) and j.current_round)
        killer = threading.Thread(target=terminate_backends, daemon=True)
        killer.start()
        try:
            _done(cluster, job.id, timeout_s=240)
        finally:
            stop.set()
            killer.join()
            admin.dispose()

        # Assert: connections were really killed, the coordinator survived them, and the
        # state is what an undisturbed run leaves.
        assert sum(killed) > 0
        assert cluster.processes["coordinator"].poll() is None, _logs(cluster)
        assert_consistent(cluster.store, job.id, rounds=3)
        for number in (1, 2, 3):
            assert len(cluster.store.updates(job.id, number)) == 2


class FreezingProxy:
    """A TCP proxy that can stop forwarding while keeping every socket open: to the
    coordinator, a worker behind it falls silent exactly as behind a dead link."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            while self.frozen.is_set():  # hold the bytes; close nothing
                time.sleep(0.05)
            try:
                data = src.recv(65536)
                if not data:
                    return
                while self.frozen.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            s.close()


def test_a_worker_cut_off_without_a_close_is_left_behind(
    tmp_path: Path,
    tiny_dir: Path,
    pg_url: str,
    fast_liveness: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        address = cluster.start_coordinator(evaluate=False)
        host, port = address.rsplit(":", 1)
        proxy = FreezingProxy((host, int(port)))
        try:
            cluster.start_worker("a", _csv(tmp_path / "a.csv", 64, seed=1), BUDGET)
            # b reaches the coordinator only through the proxy, and holds its training
            # task so the cut lands mid-round.
            cluster.address = f"127.0.0.1:{proxy.port}"
            monkeypatch.setenv("FEDPILOT_FAULT_TRAIN_DELAY_S", "600")
            cluster.start_worker("b", _csv(tmp_path / "b.csv", 64, seed=2), BUDGET)
            monkeypatch.delenv("FEDPILOT_FAULT_TRAIN_DELAY_S")
            cluster.address = address
            store = cluster.store
            _wait(cluster, "both workers", lambda: len(store.alive_workers(5)) == 2)
            spec = _spec(tmp_path, tiny_dir, rounds=2, min_workers=1, quorum=0.5)
            job_id = store.create_job("cut-off", spec)

            # Execute: cut b off while it holds its training task.
            def b_training() -> str | None:
                # The name from the same row: a worker registering between two reads
                # would be missing from a separately read name map.
                return next(
                    (w.id for w in store.workers() if w.name == "b" and w.state == "training"),
                    None,
                )

            b_id = _wait(cluster, "b to train", b_training)
            proxy.frozen.set()
            _done(cluster, job_id, timeout_s=180)

            # Assert: heartbeats stopped, so round 1 closed with a alone and b a
            # straggler; round 2 went on without b; b's process is still there, stuck.
            assert_consistent(store, job_id, rounds=2)
            first = store.round(job_id, 1)
            assert first is not None and first.stragglers == [b_id]
            (b_task,) = [t for t in store.tasks(job_id, 1, "train") if t.worker_id == b_id]
            assert b_task.status == "straggler"
            second = store.round(job_id, 2)
            assert second is not None and b_id not in second.participants
            assert cluster.processes["b"].poll() is None
        finally:
            proxy.close()


def test_a_worker_killed_mid_upload_leaves_nothing_and_rejoins(
    tmp_path: Path,
    tiny_dir: Path,
    pg_url: str,
    fast_liveness: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_faults import _kill

    job_file = _job(tmp_path, tiny_dir, rounds=3, quorum=0.5)
    b_csv = _csv(tmp_path / "b.csv", 64, seed=2)
    with LocalCluster(tmp_path / "cluster", db_url=pg_url) as cluster:
        cluster.start_coordinator(job=job_file, evaluate=False)
        (job,) = cluster.store.jobs()
        store = cluster.store
        cluster.start_worker("a", _csv(tmp_path / "a.csv", 64, seed=1), BUDGET)
        # b stalls every upload right after its manifest: the coordinator holds an open
        # stream (and a staged blob) when b dies.
        monkeypatch.setenv("FEDPILOT_FAULT_UPLOAD_DELAY_S", "600")
        cluster.start_worker("b", b_csv, BUDGET)
        monkeypatch.delenv("FEDPILOT_FAULT_UPLOAD_DELAY_S")

        def b_uploading() -> tuple[str, int] | None:
            current = store.job(job.id)
            for w in store.workers():  # the name from the same row (b may be registering)
                if w.name == "b" and w.state == "uploading" and current is not None:
                    return w.id, current.current_round
            return None

        old_b, number = _wait(cluster, "b to be uploading", b_uploading)
        _kill(cluster, "b")
        cluster.start_worker("b", b_csv, BUDGET)
        _done(cluster, job.id, timeout_s=180)

        # Assert: the broken stream stored nothing (no row, no staged file left), b was
        # a straggler of that round, and the new b trained later.
        assert_consistent(store, job.id, rounds=3)
        assert all(u.worker_id != old_b for n in (1, 2, 3) for u in store.updates(job.id, n))
        rnd = store.round(job.id, number)
        assert rnd is not None and old_b in rnd.stragglers
        staging = cluster.data_dir / "blobs" / "00"
        assert not list(staging.glob(".tmp-*")), "a staged upload was left behind"
        names = _names(store)
        new_b = {w.id for w in store.workers() if names[w.id] == "b"} - {old_b}
        later = [u for n in range(number + 1, 4) for u in store.updates(job.id, n)]
        assert any(u.worker_id in new_b for u in later), _logs(cluster)
