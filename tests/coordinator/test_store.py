"""The store's contract, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import update

from fedpilot.coordinator.db import migrate
from fedpilot.coordinator.db.models import AdapterVersion, Base, ModuleStat, Task, Update, Worker
from fedpilot.coordinator.db.store import AuthError, Store, TaskClosed, make_engine, utcnow
from fedpilot.core.ig_score import ModuleStats


def test_migrations_build_exactly_the_models_schema(database_url: str) -> None:
    engine = make_engine(database_url)
    assert not migrate.is_current(engine)
    migrate.upgrade(engine)
    assert migrate.is_current(engine)
    migrate.upgrade(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


@pytest.fixture()
def store(database_url: str) -> Store:
    return Store.open(database_url)


def _job_with_round(store: Store) -> tuple[str, str]:
    job_id = store.create_job("j", {"rounds": 2})
    worker_id, _ = store.register_worker("w", {"gpu": "a10"}, {"kind": "cpu"}, 10**9)
    task = Task(
        id="t1",
        job_id=job_id,
        round=1,
        worker_id=worker_id,
        kind="train",
        modules=["m"],
        scores={},
        status="offered",
    )
    store.open_round(
        job_id,
        1,
        state="training",
        participants=[worker_id],
        deadline_at=utcnow() + timedelta(minutes=5),
        tasks=[task],
    )
    return job_id, worker_id


def _update(job_id: str, worker_id: str, task_id: str = "t1") -> Update:
    return Update(
        job_id=job_id,
        round=1,
        worker_id=worker_id,
        task_id=task_id,
        sha256="a" * 64,
        byte_count=10,
        num_samples=5,
        loss_before=2.0,
        loss_after=1.0,
        local_scores={},
        predicted_bytes=1,
        measured_peak_bytes=1,
        train_seconds=0.1,
    )


def test_tokens_are_stored_hashed_and_checked(store: Store) -> None:
    worker_id, token = store.register_worker("w", {}, {}, 1)
    assert store.authenticate(worker_id, token).id == worker_id
    with store.session() as s:
        assert s.get(Worker, worker_id).token_hash != token
    with pytest.raises(AuthError):
        store.authenticate(worker_id, token + "x")
    with pytest.raises(AuthError):
        store.authenticate("nobody", token)


def test_a_registered_worker_is_known_from_memory_with_its_columns(store: Store) -> None:
    worker_id, token = store.register_worker("w", {"site": "a"}, {"kind": "cpu"}, 7)
    # Its next calls authenticate without the database, and a wrong token still fails.
    worker = store.known_worker(worker_id, token)
    assert worker is not None and store.known_token(token) is worker
    assert (worker.name, worker.labels, worker.budget_bytes) == ("w", {"site": "a"}, 7)
    assert worker.registered_at is not None and worker.last_heartbeat is not None
    with pytest.raises(AuthError):
        store.known_worker(worker_id, token + "x")
    assert store.known_token(token + "x") is None
    # Another process's store (a restart) reads the same worker from the database.
    again = Store(store.engine)
    assert again.known_worker(worker_id, token) is None
    assert again.authenticate(worker_id, token).name == "w"


def test_the_same_update_counts_once(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    first = store.record_update(_update(job_id, worker_id))
    again = store.record_update(_update(job_id, worker_id))
    assert not first.duplicate and again.duplicate and again.update_id == first.update_id
    assert len(store.updates(job_id, 1)) == 1
    assert store.task("t1").status == "done"


def test_version_commit_is_all_or_nothing(store: Store, monkeypatch) -> None:
    job_id, _ = _job_with_round(store)
    stats = {"m": ModuleStats(update_count=1, last_round=1, score=0.5)}

    # A failure inside the transaction (after the version row is added) leaves nothing.
    original_get = type(store.session()).get

    def failing_get(self, entity, ident, *a, **k):
        if entity is ModuleStat:
            raise RuntimeError("disk full")
        return original_get(self, entity, ident, *a, **k)

    monkeypatch.setattr(type(store.session()), "get", failing_get)
    with pytest.raises(RuntimeError):
        store.commit_version(
            job_id,
            version=1,
            round_number=1,
            sha256="b" * 64,
            byte_count=3,
            stats=stats,
            close_round={"state": "closed"},
            job_state="done",
        )
    monkeypatch.undo()
    assert store.latest_version(job_id) is None
    assert store.version(job_id, 1) is None  # a miss is not remembered
    assert store.module_stats(job_id) == {}
    assert store.round(job_id, 1).closed_at is None
    assert store.job(job_id).state == "training"

    assert store.commit_version(
        job_id,
        version=1,
        round_number=1,
        sha256="b" * 64,
        byte_count=3,
        stats=stats,
        close_round={"state": "closed"},
        job_state="done",
    )
    assert store.latest_version(job_id).sha256 == "b" * 64
    assert store.version(job_id, 1).sha256 == "b" * 64
    assert store.version(job_id, 1) is store.version(job_id, 1)  # committed rows are cached
    assert store.module_stats(job_id) == stats
    assert store.round(job_id, 1).closed_at is not None
    assert store.job(job_id).state == "done"
    # A retry of the same commit changes nothing.
    assert not store.commit_version(
        job_id, version=1, round_number=1, sha256="c" * 64, byte_count=3
    )
    assert store.latest_version(job_id).sha256 == "b" * 64


def test_versions_form_a_checksum_chain(store: Store) -> None:
    job_id, _ = _job_with_round(store)
    for v, sha in enumerate(["0" * 64, "1" * 64, "2" * 64]):
        store.commit_version(job_id, version=v, round_number=v, sha256=sha, byte_count=1)
    chain = store.versions(job_id)
    assert [v.parent_sha256 for v in chain] == [None, "0" * 64, "1" * 64]


def test_alive_workers_are_those_with_recent_heartbeats(store: Store) -> None:
    fresh, _ = store.register_worker("fresh", {}, {}, 1)
    stale, _ = store.register_worker("stale", {}, {}, 1)
    with store.session() as s, s.begin():
        s.execute(
            update(Worker)
            .where(Worker.id == stale)
            .values(last_heartbeat=utcnow() - timedelta(minutes=10))
        )
    assert [w.id for w in store.alive_workers(60)] == [fresh]
    # The driver's column reads agree with the rows
    assert store.alive_worker_ids(60) == {fresh} and store.alive_count(60) == 1
    assert store.worker_names() == {fresh: "fresh", stale: "stale"}
    store.heartbeat(stale, "idle", None)
    assert {w.id for w in store.alive_workers(60)} == {fresh, stale}
    # A buffered heartbeat counts before the driver's next flush
    assert store.alive_worker_ids(60) == {fresh, stale} and store.alive_count(60) == 2


def test_task_states_are_the_rounds_worker_and_status_of_one_kind(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    assert store.task_states(job_id, 1, "train") == [(worker_id, "offered")]
    store.set_task_status("t1", "done")
    assert store.task_states(job_id, 1, "train") == [(worker_id, "done")]
    assert store.task_states(job_id, 1, "profile") == []
    assert store.task_states(job_id, 2, "train") == []


def test_offered_tasks_are_re_offered_until_finished(store: Store) -> None:
    _job_id, worker_id = _job_with_round(store)
    assert store.offered_task(worker_id).id == "t1"
    assert store.offered_task(worker_id).id == "t1"
    store.set_task_status("t1", "refused", "budget")
    assert store.offered_task(worker_id) is None
    assert store.task("t1").reason == "budget"


def test_a_task_state_is_its_owner_kind_and_status(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    assert tuple(store.task_state("t1")) == ("t1", job_id, 1, worker_id, "train", "offered")
    store.set_task_status("t1", "refused", "budget")
    assert store.task_state("t1").status == "refused"
    assert store.task_state("nope") is None and store.task_state("\x00") is None


def test_an_offered_task_comes_with_its_rounds_deadline(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    offer = store.offered_task(worker_id)
    assert offer is not None
    assert (offer.id, offer.job_id, offer.round, offer.kind) == ("t1", job_id, 1, "train")
    assert offer.modules == ["m"] and offer.adapter_version == 0
    assert offer.deadline_at == store.round(job_id, 1).deadline_at is not None


def test_an_upload_target_is_the_task_its_round_and_any_earlier_update(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    target = store.upload_target("t1")
    assert target is not None
    assert (target.id, target.job_id, target.round, target.worker_id) == (
        "t1",
        job_id,
        1,
        worker_id,
    )
    assert (target.kind, target.status, target.modules) == ("train", "offered", ["m"])
    assert (target.round_state, target.round_closed_at, target.update_id) == (
        "training",
        None,
        None,
    )
    record = store.record_update(_update(job_id, worker_id))
    again = store.upload_target("t1")
    assert again.status == "done" and again.update_id == record.update_id
    assert store.upload_target("nope") is None and store.upload_target("x" * 100) is None


def test_an_update_for_a_closed_task_is_refused_and_stores_nothing(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    assert store.close_training(job_id, 1, "deadline") == [worker_id]
    committed: list[bool] = []
    with pytest.raises(TaskClosed, match="straggler"):
        store.record_update(_update(job_id, worker_id), before_commit=lambda: committed.append(1))
    assert committed == [] and store.updates(job_id, 1) == []
    assert store.task("t1").status == "straggler"


def test_rejections_are_recorded_per_job(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    store.record_rejection(
        "ERROR_REASON_NON_FINITE",
        "tensor x has NaN",
        job_id=job_id,
        round_number=1,
        worker_id=worker_id,
    )
    (row,) = store.rejections(job_id)
    assert row.reason == "ERROR_REASON_NON_FINITE" and "NaN" in row.message
    assert store.count(AdapterVersion) == 0


def test_a_refused_update_row_never_makes_its_blob_visible(store: Store, tmp_path) -> None:
    """The row is flushed first and the blob committed inside its transaction: a row the
    database refuses (here BIGINT overflow, which only PostgreSQL enforces) leaves none."""
    from fedpilot.coordinator.db.blobs import BlobStore

    job_id, worker_id = _job_with_round(store)
    blobs = BlobStore(tmp_path / "blobs")
    staged = blobs.stage([b"update bytes"])
    row = _update(job_id, worker_id)
    row.sha256 = staged.sha256
    row.measured_peak_bytes = 2**63
    if store.engine.dialect.name == "postgresql":
        with pytest.raises(Exception, match="out of range"):
            store.record_update(row, before_commit=staged.commit)
        assert not staged.committed and not blobs.exists(staged.sha256)
        assert store.updates(job_id, 1) == []
        staged.discard()
    good = _update(job_id, worker_id)
    fresh = blobs.stage([b"update bytes"])
    good.sha256 = fresh.sha256
    assert not store.record_update(good, before_commit=fresh.commit).duplicate
    assert blobs.exists(fresh.sha256) and store.referenced_blobs() == {fresh.sha256}


def test_a_heartbeat_the_database_refuses_is_dropped_alone(store: Store) -> None:
    _, worker_id = _job_with_round(store)
    other, _ = store.register_worker("o", {}, {"kind": "cpu"}, 1)
    store.heartbeat(worker_id, "training", "t" * 100)  # longer than the column
    store.heartbeat(other, "training", "t1")
    store.flush_heartbeats()
    states = {w.id: (w.state, w.current_task) for w in store.workers()}
    assert states[other] == ("training", "t1")
    if store.engine.dialect.name == "postgresql":
        assert states[worker_id][1] is None  # refused, not retried forever
    assert store.flush_heartbeats() == 0


def test_workers_are_found_by_their_token_alone(store: Store) -> None:
    worker_id, token = store.register_worker("w", {}, {"kind": "cpu"}, 1)
    found = store.worker_by_token(token)
    assert found is not None and found.id == worker_id
    for wrong in ("", "x" * 43, token[:-1], "t" * 10_000):
        assert store.worker_by_token(wrong) is None


def test_a_pool_wait_that_runs_out_is_retried_and_a_driver_step_keeps_its_job(
    pg_schema_url: str,
) -> None:
    """Every pooled connection busy (2,000 long polls woken at once did that) is a
    moment's condition: a store call waits for a connection again rather than fail, and
    a round-driver step that still hits it leaves the job for the next tick."""
    import threading

    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    from fedpilot.coordinator.rounds import _transient

    migrate.upgrade(make_engine(pg_schema_url))
    engine = create_engine(pg_schema_url, pool_size=1, max_overflow=0, pool_timeout=0.2)
    store = Store(engine)
    held = engine.connect()  # the pool's only connection
    held.execute(text("SELECT 1"))
    release = threading.Timer(1.0, held.close)
    release.start()
    try:
        assert store.jobs() == []  # waited past several 0.2 s pool timeouts, then ran
    finally:
        release.join()
    assert not release.is_alive()
    assert _transient(PoolTimeout("QueuePool limit reached"))
    assert not _transient(ValueError("a real fault"))
    engine.dispose()


def _profile(budget: int) -> dict[str, object]:
    return {
        "memory": {"modules": {}, "layer_activation_bytes": [], "base_bytes": budget},
        "tensors": {"m/lora_A": [2, 4]},
        "budget_bytes": budget,
        "method": "saved_tensors",
        "device": "cpu",
    }


def test_a_profile_report_replaces_the_earlier_one_and_finishes_its_task(store: Store) -> None:
    job_id, worker_id = _job_with_round(store)
    store.finish_profile_task("t1", job_id, worker_id, _profile(7))
    assert store.task_state("t1").status == "done"
    first = store.profiles(job_id)[worker_id]
    assert first.budget_bytes == 7 and first.tensors == {"m/lora_A": [2, 4]}
    # Reported again (a later round's profile task): one row, the newer values
    store.set_task_status("t1", "offered")
    store.finish_profile_task("t1", job_id, worker_id, _profile(9))
    again = store.profiles(job_id)
    assert list(again) == [worker_id] and again[worker_id].id == first.id
    assert again[worker_id].budget_bytes == 9 and again[worker_id].created_at >= first.created_at
    # A late report is kept, and its straggler task stays a straggler
    store.set_task_status("t1", "straggler")
    store.finish_profile_task("t1", job_id, worker_id, _profile(11))
    assert store.profiles(job_id)[worker_id].budget_bytes == 11
    assert store.task_state("t1").status == "straggler"


def test_an_open_poll_keeps_its_worker_alive_until_it_closes(store: Store) -> None:
    polling, _ = store.register_worker("polling", {}, {}, 1)
    silent, _ = store.register_worker("silent", {}, {}, 1)

    def silence_since_long_ago() -> None:
        store.flush_heartbeats(poll_stale_after_s=3600)  # what is buffered, without refreshing
        with store.session() as s, s.begin():
            s.execute(update(Worker).values(last_heartbeat=utcnow() - timedelta(minutes=10)))

    silence_since_long_ago()
    store.poll_opened(polling)  # the poll's start is a heartbeat
    assert store.alive_worker_ids(60) == {polling}
    silence_since_long_ago()
    # Refreshed only once its last beat is a third of the timeout old: not yet at 60 s
    assert store.alive_worker_ids(60) == set()
    time.sleep(0.4)  # past a third of a 1 s timeout: refreshed as liveness is read
    assert store.alive_worker_ids(1.0) == {polling}
    store.poll_opened(polling)  # a second poll of the same worker, then one of them ends
    store.poll_closed(polling)
    silence_since_long_ago()
    time.sleep(0.4)
    assert store.alive_worker_ids(1.0) == {polling}
    store.poll_closed(polling)  # no poll open: silence counts again
    silence_since_long_ago()
    time.sleep(0.4)
    assert store.alive_worker_ids(1.0) == set()
    assert silent not in store.alive_worker_ids(60)


def test_a_job_has_a_version_once_one_is_committed(store: Store) -> None:
    job_id, _ = _job_with_round(store)
    assert not store.has_version(job_id) and not store.has_version("nope")
    store.commit_version(job_id, version=0, round_number=0, sha256="0" * 64, byte_count=1)
    assert store.has_version(job_id) and store.has_version(job_id)  # the second remembered
