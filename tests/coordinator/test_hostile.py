"""Hostile and broken input at the gRPC boundary: impersonation, registration floods,
malformed protobuf bytes and fuzzed upload manifests. Each gets a clear refusal, is
counted in a metric, and changes nothing stored."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from fedpilot.coordinator.db.models import Worker
from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.v1 import coordinator_pb2, errors_pb2, transfer_pb2
from fedpilot.wire import encode_tensors, error_detail_from_rpc_error
from fedpilot.worker.client import CoordinatorClient
from tests.coordinator.test_service import (  # noqa: F401 (fixtures)
    BASE,
    MODULE_BYTES,
    SHAPES,
    _manifest,
    _poll,
    _profile,
    _raw_upload,
    _reason,
    _tensors,
    round_ready,
    running,
)


def _rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("fedpilot_rejections_total", {"reason": reason}) or 0.0


def test_a_worker_cannot_act_as_another(round_ready) -> None:  # noqa: F811
    store, victim, job_id, task = round_ready
    mallory = CoordinatorClient(victim.target)
    mallory.register("mallory", budget_bytes=1 << 40)
    good = _tensors(["head"])
    before = _rejections("ERROR_REASON_BAD_TOKEN")

    # Her own valid token with the victim's id: the token does not belong to that id.
    own_token = mallory._token
    mallory.authenticate(victim.worker_id, own_token)
    assert _reason(lambda: mallory.upload_update(_manifest(task), good)) == "ERROR_REASON_BAD_TOKEN"
    assert _reason(lambda: mallory.heartbeat()) == "ERROR_REASON_BAD_TOKEN"
    # Her own identity, the victim's task: not assigned to her.
    registered = {w.name: w.id for w in store.workers()}
    mallory.authenticate(registered["mallory"], own_token)
    assert (
        _reason(lambda: mallory.upload_update(_manifest(task), good)) == "ERROR_REASON_NOT_ASSIGNED"
    )
    mallory.close()
    assert _rejections("ERROR_REASON_BAD_TOKEN") == before + 2
    assert store.updates(job_id, task.round) == []
    # The victim is unaffected.
    assert not victim.upload_update(_manifest(task), good).duplicate


@pytest.fixture()
def guarded(tmp_path: Path) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, grpc_port=0, registrations_per_s=0.5, registration_burst=5
    )
    coordinator = start(settings)
    yield coordinator
    coordinator.stop(grace=0.2)


def test_a_registration_flood_is_rate_limited(guarded: RunningCoordinator) -> None:
    before = _rejections("ERROR_REASON_RATE_LIMITED")
    client = CoordinatorClient(f"127.0.0.1:{guarded.port}", timeout_s=5)
    outcomes = []
    for i in range(20):
        try:
            client.register(f"flood-{i}", budget_bytes=1)
            outcomes.append("ok")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            detail = error_detail_from_rpc_error(e)
            assert detail is not None and "too many registrations" in detail.message
            outcomes.append("limited")
    client.close()
    assert outcomes[:5] == ["ok"] * 5
    assert outcomes.count("ok") <= 6  # the burst, plus at most one refilled token
    assert guarded.store.count(Worker) == outcomes.count("ok")
    assert _rejections("ERROR_REASON_RATE_LIMITED") == before + outcomes.count("limited")


def test_malformed_protobuf_bytes_are_refused_and_counted(guarded: RunningCoordinator) -> None:
    before = _rejections("ERROR_REASON_MALFORMED")
    channel = grpc.insecure_channel(f"127.0.0.1:{guarded.port}")
    raw = channel.unary_unary(
        "/fedpilot.v1.Coordinator/Register",
        request_serializer=None,
        response_deserializer=None,
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as e:
            raw(garbage, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None and "not a valid Register request" in detail.message
    channel.close()
    assert _rejections("ERROR_REASON_MALFORMED") == before + 3
    assert guarded.store.count(Worker) == 0
    # The server still serves well-formed requests.
    client = CoordinatorClient(f"127.0.0.1:{guarded.port}", timeout_s=5)
    assert client.register("after-garbage", budget_bytes=1).worker_id
    client.close()


_FIELDS = st.sampled_from(["total_bytes", "sha256", "shape", "dtype", "name", "drop", "extra"])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=_FIELDS,
    number=st.integers(min_value=0, max_value=2**63 - 1),
    text=st.text(max_size=80),
    cut=st.integers(min_value=-64, max_value=64),
)
def test_fuzzed_manifests_and_payloads_are_refused_without_a_trace(
    round_ready,  # noqa: F811
    field: str,
    number: int,
    text: str,
    cut: int,
) -> None:
    store, client, job_id, task = round_ready
    good = _tensors(["head"])
    data, honest = encode_tensors(good)
    payload = transfer_pb2.PayloadManifest()
    payload.CopyFrom(honest)
    specs = payload.tensors
    if field == "total_bytes":
        payload.total_bytes = number if number != honest.total_bytes else number + 1
    elif field == "sha256":
        payload.sha256 = text if text != honest.sha256 else text + "0"
    elif field == "shape":
        specs[number % len(specs)].shape.append(number % 7 + 2)
    elif field == "dtype":
        specs[number % len(specs)].dtype = number % 5 if number % 5 != specs[0].dtype else 0
    elif field == "name":
        specs[number % len(specs)].name = text if text not in good else text + "x"
    elif field == "drop":
        del specs[number % len(specs)]
    else:
        specs.add(name=f"head/{text}", shape=[1], dtype=specs[0].dtype)
    body = bytes(data)
    if cut > 0:
        body += bytes(cut)
    elif cut < 0:
        body = body[:cut]
    manifest = _manifest(task, payload=payload)
    with pytest.raises(grpc.RpcError) as e:
        _raw_upload(client, manifest, body, chunk=4096)
    detail = error_detail_from_rpc_error(e.value)
    assert detail is not None and detail.reason != 0 and detail.message
    assert store.updates(job_id, task.round) == []


def test_absurd_ids_and_numbers_get_clean_refusals(round_ready) -> None:  # noqa: F811
    """NUL bytes, overlong ids and numbers beyond the database's integers are answered with
    a reason, on PostgreSQL as on SQLite, never with an internal error."""
    store, client, job_id, task = round_ready
    good = _tensors(["head"])
    for bad_job in ("\x00" * 8, "j" * 500):
        assert (
            _reason(lambda bad_job=bad_job: client.download_adapter(bad_job, 0))
            == "ERROR_REASON_UNKNOWN_ADAPTER_VERSION"
        )
    assert (
        _reason(lambda: client.download_adapter(job_id, 2**40))
        == "ERROR_REASON_UNKNOWN_ADAPTER_VERSION"
    )
    for bad_task in ("\x00", "t" * 500):
        assert (
            _reason(
                lambda bad_task=bad_task: client.upload_update(
                    _manifest(task, task_id=bad_task), good
                )
            )
            == "ERROR_REASON_NOT_ASSIGNED"
        )
    assert (
        _reason(lambda: client.upload_update(_manifest(task, round=2**40), good))
        == "ERROR_REASON_WRONG_ROUND"
    )
    stranger = CoordinatorClient(client.target)
    for bad_worker in ("\x00", "w" * 500):
        stranger.authenticate(bad_worker, "token")
        assert _reason(stranger.heartbeat) in {
            "ERROR_REASON_BAD_TOKEN",
            "ERROR_REASON_UNKNOWN_WORKER",
        }
    stranger.close()
    assert store.updates(job_id, task.round) == []


# -- the attacks of a malicious enrolled worker, each against a real coordinator on PostgreSQL


def _blob_files(coordinator: RunningCoordinator) -> set[str]:
    root = Path(coordinator.driver.blobs.root)
    return {p.name for p in root.glob("??/*") if p.parent.name != "00"}


def _wait(predicate, timeout_s: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture()
def pg_coordinator(tmp_path: Path, pg_schema_url: str) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(
        data_dir=tmp_path,
        database_url=pg_schema_url,
        grpc_port=0,
        http_port=0,
        tick_seconds=0.05,
        grpc_threads=16,
        max_rpcs_per_worker=4,
        stream_idle_timeout_s=1.0,
        metrics_max_workers=3,
    )
    coordinator = start(settings)
    yield coordinator
    coordinator.stop(grace=0.2)


def _job(store, **changes) -> str:
    spec = {
        "rounds": 1,
        "min_workers": 1,
        "round_deadline_s": 60,
        "quorum": 1.0,
        "ig_probe_batches": 0,
        "lora": {"rank": 2, "target_modules": ["q"]},
    }
    return store.create_job("hostile", {**spec, **changes})


def _ready_worker(coordinator: RunningCoordinator, name: str = "honest"):
    client = CoordinatorClient(f"127.0.0.1:{coordinator.port}", timeout_s=10)
    client.register(name, budget_bytes=BASE + MODULE_BYTES)
    return client


def _train_task(client: CoordinatorClient, job_id: str):
    task = _poll(client, coordinator_pb2.TASK_KIND_PROFILE)
    client.report_profile(job_id, task.task_id, _profile())
    return _poll(client, coordinator_pb2.TASK_KIND_TRAIN)


def test_a_bad_heartbeat_neither_stops_the_driver_nor_breaks_the_worker_list(
    pg_coordinator: RunningCoordinator,
) -> None:
    """Attack 1: a task id longer than its column. Refused at the RPC; and a bad heartbeat
    that reaches the buffer anyway is dropped alone, without failing the batch."""
    store = pg_coordinator.store
    client = _ready_worker(pg_coordinator)
    job_id = _job(store)
    before = _rejections("ERROR_REASON_MALFORMED")
    for bad in ("t" * 100, "\x00"):
        assert _reason(lambda bad=bad: client.heartbeat(task_id=bad)) == "ERROR_REASON_MALFORMED"
    assert _rejections("ERROR_REASON_MALFORMED") == before + 2
    # Past the boundary (as an older coordinator could have buffered it): the batch is
    # written row by row, the bad row dropped, the good one kept.
    other = _ready_worker(pg_coordinator, "other")
    store.heartbeat(client.worker_id, "training", "x" * 100)
    store.heartbeat(other.worker_id, "training", None)
    states = {w.id: w.state for w in store.workers()}
    assert states[other.worker_id] == "training"
    task = _train_task(client, job_id)
    assert client.upload_update(_manifest(task), _tensors(list(task.modules)))
    _wait(lambda: store.job(job_id).state == "done", what="the job to finish")
    http = httpx.get(f"http://127.0.0.1:{pg_coordinator.http_port}/api/v1/workers")
    assert http.status_code == 200 and len(http.json()) == 2
    assert pg_coordinator.driver.errors == 0 and pg_coordinator.thread.is_alive()
    client.close()
    other.close()


def test_a_failing_tick_is_logged_counted_and_carried_on(
    pg_coordinator: RunningCoordinator, caplog
) -> None:
    """The driver loop survives a tick that raises (here: its tables renamed away under it,
    a real PostgreSQL error); health shows it, and it resumes when the cause is gone."""
    from sqlalchemy import text

    store = pg_coordinator.store
    base = f"http://127.0.0.1:{pg_coordinator.http_port}"
    errors = REGISTRY.get_sample_value("fedpilot_driver_errors_total") or 0.0
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs RENAME TO jobs_gone"))
    try:
        _wait(lambda: pg_coordinator.driver.errors >= 3, what="failing ticks")
        assert pg_coordinator.thread.is_alive()
        assert (REGISTRY.get_sample_value("fedpilot_driver_errors_total") or 0) >= errors + 3
        assert "tick failed; carrying on" in caplog.text
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE jobs_gone RENAME TO jobs"))
    client = _ready_worker(pg_coordinator)
    job_id = _job(store)
    task = _train_task(client, job_id)
    client.upload_update(_manifest(task), _tensors(list(task.modules)))
    _wait(lambda: store.job(job_id).state == "done", what="the job to finish")
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["driver_running"] is True and ready["driver_errors"] >= 3
    assert httpx.get(f"{base}/healthz").status_code == 200
    # A driver thread that ended is reported as such.
    pg_coordinator.stop_event.set()
    pg_coordinator.driver.signals.upload_accepted()
    pg_coordinator.thread.join(timeout=10)
    dead = httpx.get(f"{base}/healthz")
    assert dead.status_code == 503 and "driver" in dead.json()["status"]
    assert httpx.get(f"{base}/readyz").status_code == 503
    client.close()


def test_non_finite_and_out_of_range_numbers_are_refused_and_leave_no_blob(
    pg_coordinator: RunningCoordinator,
) -> None:
    """Attack 2: NaN/inf losses, seconds and scores, integers of 2^63 and more."""
    store = pg_coordinator.store
    client = _ready_worker(pg_coordinator)
    job_id = _job(store)
    task = _train_task(client, job_id)
    good = _tensors(list(task.modules))
    nan, inf = float("nan"), float("inf")
    cases = {
        "train_loss_before": ({"train_loss_before": nan}, "ERROR_REASON_NON_FINITE"),
        "train_loss_after": ({"train_loss_after": -inf}, "ERROR_REASON_NON_FINITE"),
        "train_seconds": ({"train_seconds": inf}, "ERROR_REASON_NON_FINITE"),
        "local_scores[head]": ({"local_scores": {"head": nan}}, "ERROR_REASON_NON_FINITE"),
        "measured_peak_bytes": ({"measured_peak_bytes": 2**63}, "ERROR_REASON_MALFORMED"),
        "predicted_peak_bytes": ({"predicted_peak_bytes": 2**64 - 1}, "ERROR_REASON_MALFORMED"),
        "num_samples": ({"num_samples": 2**63}, "ERROR_REASON_MALFORMED"),
    }
    blobs_before = _blob_files(pg_coordinator)
    for field, (change, reason) in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            client.upload_update(_manifest(task, **change), good)
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None
        assert (errors_pb2.ErrorReason.Name(detail.reason), detail.field) == (reason, field)
    assert store.updates(job_id, task.round) == []
    assert _blob_files(pg_coordinator) == blobs_before
    # The honest upload still counts and the job finishes (no NaN ever reaches the JSON).
    client.upload_update(_manifest(task, local_scores={"head": 0.25}), good)
    _wait(lambda: store.job(job_id).state in ("done", "failed"), what="the job to end")
    assert store.job(job_id).state == "done", store.job(job_id).error
    client.close()


def test_trailing_bytes_are_refused_and_stored_nowhere(pg_coordinator: RunningCoordinator) -> None:
    """Attack 6: bytes after the last tensor, declared honestly in size and sha256."""
    store = pg_coordinator.store
    client = _ready_worker(pg_coordinator)
    job_id = _job(store)
    task = _train_task(client, job_id)
    data, honest = encode_tensors(_tensors(list(task.modules)))
    padded = bytes(data) + b"\x00" * 4096
    payload = transfer_pb2.PayloadManifest(
        tensors=honest.tensors,
        total_bytes=len(padded),
        sha256=hashlib.sha256(padded).hexdigest(),
    )
    blobs_before = _blob_files(pg_coordinator)
    with pytest.raises(grpc.RpcError) as e:
        _raw_upload(client, _manifest(task, payload=payload), padded, chunk=1024)
    detail = error_detail_from_rpc_error(e.value)
    assert detail is not None and "after the last tensor" in detail.message
    assert _blob_files(pg_coordinator) == blobs_before
    assert not list((Path(pg_coordinator.driver.blobs.root) / "00").glob(".tmp-*"))
    assert store.updates(job_id, task.round) == []
    client.close()


def test_registration_fields_are_capped(pg_coordinator: RunningCoordinator) -> None:
    """Attack 6: a megabyte of labels, NUL in names, budgets beyond BIGINT."""
    from fedpilot.v1 import coordinator_pb2 as pb

    target = f"127.0.0.1:{pg_coordinator.port}"
    client = CoordinatorClient(target, timeout_s=10)
    cases = {
        "labels": lambda: client.register("w", labels={f"k{i}": "v" * 1000 for i in range(1000)}),
        "labels key": lambda: client.register("w", labels={"k" * 10_000: "v"}),
        "name": lambda: client.register("bad\x00name"),
        "budget_bytes": lambda: client.register("w", budget_bytes=2**63),
        "device.name": lambda: client.register("w", device=pb.DeviceInfo(name="d" * 5000)),
    }
    for field, call in cases.items():
        with pytest.raises(grpc.RpcError) as e:
            call()
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None and detail.field == field, (field, detail)
    assert pg_coordinator.store.count(Worker) == 0
    client.register("fine", labels={"zone": "a", "gpu": "h100"}, budget_bytes=1 << 30)
    (worker,) = pg_coordinator.store.workers()
    assert worker.labels == {"zone": "a", "gpu": "h100"}
    client.close()


def _profile_with(tensors: dict[str, tuple[int, ...]]):
    msg = _profile()
    del msg.tensors[:]
    for name in sorted(tensors):
        msg.tensors.add(name=name, shape=list(tensors[name]), dtype=transfer_pb2.DTYPE_F32)
    return msg


def test_one_profile_cannot_set_the_adapter_for_everyone(pg_coordinator: RunningCoordinator):
    """Attack 3: shapes out of the model's and the spec's bounds are refused when reported;
    shapes within bounds but unlike the others' are outvoted, then refused."""
    store = pg_coordinator.store
    job_id = _job(store, min_workers=3, rounds=1)
    honest = [_ready_worker(pg_coordinator, f"honest-{i}") for i in range(2)]
    mallory = _ready_worker(pg_coordinator, "mallory")
    tasks = {c.worker_id: _poll(c, coordinator_pb2.TASK_KIND_PROFILE) for c in [*honest, mallory]}
    shapes = {k: tuple(v.shape) for k, v in _tensors(SHAPES).items()}
    absurd = {
        "enc.1.q/lora_A": ((2, 10**9), "ERROR_REASON_SHAPE_MISMATCH"),  # beyond the model
        "enc.2.q/lora_B": ((4, 64), "ERROR_REASON_SHAPE_MISMATCH"),  # not the job's rank
        "head/weight": ((3, 4, 1, 1, 1), "ERROR_REASON_SHAPE_MISMATCH"),
    }
    mtask = tasks[mallory.worker_id]
    for name, (shape, reason) in absurd.items():
        with pytest.raises(grpc.RpcError) as e:
            mallory.report_profile(job_id, mtask.task_id, _profile_with({**shapes, name: shape}))
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None
        assert errors_pb2.ErrorReason.Name(detail.reason) == reason
        assert detail.field == f"profile.tensors[{name}]" and name in detail.message
    # Within bounds (a bigger head, which the model allows), but alone: outvoted.
    mallory.report_profile(job_id, mtask.task_id, _profile_with({**shapes, "head/weight": (5, 4)}))
    for c in honest:
        c.report_profile(job_id, tasks[c.worker_id].task_id, _profile())
    trains = {c.worker_id: _poll(c, coordinator_pb2.TASK_KIND_TRAIN) for c in honest}
    _, adapter = honest[0].download_adapter(job_id, 0)
    assert {k: v.shape for k, v in adapter.items()} == shapes
    (refused,) = [t for t in store.tasks(job_id, 1, "train") if t.worker_id == mallory.worker_id]
    assert refused.status == "refused" and "differ from the global adapter" in refused.reason
    for c in honest:
        task = trains[c.worker_id]
        c.upload_update(_manifest(task), _tensors(list(task.modules)))
    _wait(lambda: store.job(job_id).state == "done", what="the job to finish")
    for c in [*honest, mallory]:
        c.close()


def test_silent_streams_do_not_starve_registration(pg_coordinator: RunningCoordinator) -> None:
    """Attack 5: hundreds of upload streams that never send a message, without a token and
    from an enrolled worker, with 16 handler threads: Register still answers."""
    target = f"127.0.0.1:{pg_coordinator.port}"
    enrolled = _ready_worker(pg_coordinator, "enrolled")
    channel = grpc.insecure_channel(target)
    upload = channel.stream_unary(
        "/fedpilot.v1.Coordinator/UploadUpdate",
        request_serializer=transfer_pb2.UploadUpdateRequest.SerializeToString,
        response_deserializer=transfer_pb2.UploadUpdateRequest.FromString,
    )
    hold = threading.Event()

    def silent():
        hold.wait(60)
        return
        yield  # a generator that sends nothing until released

    anonymous = [upload.future(silent(), timeout=30) for _ in range(300)]
    own = [upload.future(silent(), timeout=30, metadata=enrolled._metadata()) for _ in range(20)]
    try:
        newcomer = CoordinatorClient(target, timeout_s=10)
        assert newcomer.register("newcomer", budget_bytes=1).worker_id
        newcomer.close()
        codes = [f.exception().code() for f in anonymous]
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
        # The enrolled worker gets at most max_rpcs_per_worker streams; they are cancelled
        # once idle, and the rest are refused at once.
        own_codes = [f.exception().code() for f in own]
        assert own_codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 16
        assert set(own_codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
        assert (
            REGISTRY.get_sample_value("fedpilot_rejections_total", {"reason": "stream_idle"}) or 0
        ) >= 1
        # Its slots are free again.
        assert enrolled.heartbeat() is not None
    finally:
        hold.set()
        channel.close()
        enrolled.close()


def test_unexpected_errors_are_internal_with_an_id_and_never_sql(
    pg_coordinator: RunningCoordinator, caplog
) -> None:
    """Attack 8: an error nobody anticipated (a real PostgreSQL error: the tasks table gone)
    reaches the worker as INTERNAL with an id, and the job's error holds no SQL either."""
    from sqlalchemy import text

    store = pg_coordinator.store
    client = _ready_worker(pg_coordinator)
    job_id = _job(store)
    _poll(client, coordinator_pb2.TASK_KIND_PROFILE)
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE tasks RENAME TO tasks_gone"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.poll_task(0)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None and detail.reason == errors_pb2.ERROR_REASON_INTERNAL
        error_id = detail.message.split()[2].rstrip(";")
        for leak in ("SELECT", "tasks", "psycopg", "UndefinedTable"):
            assert leak not in (e.value.details() or "") and leak not in detail.message
        assert error_id in caplog.text  # the operator can find the details
        _wait(lambda: store.job(job_id).state == "failed", what="the job to fail")
    finally:
        with store.engine.begin() as conn:
            conn.execute(text("ALTER TABLE tasks_gone RENAME TO tasks"))
    error = store.job(job_id).error
    assert error.startswith("internal error ") and "SELECT" not in error and "tasks" not in error
    client.close()


def test_per_worker_metrics_are_keyed_by_id_and_bounded(
    pg_coordinator: RunningCoordinator,
) -> None:
    """Attack 8: series per worker name forever. Keyed by id now, at most 3 here."""
    target = f"127.0.0.1:{pg_coordinator.port}"
    ids = []
    for i in range(5):
        c = CoordinatorClient(target, timeout_s=10)
        ids.append(c.register(f"name-{i}-secret-ish", budget_bytes=1000 + i).worker_id)
        c.close()
    values = [
        REGISTRY.get_sample_value("fedpilot_registered_budget_bytes", {"worker": wid})
        for wid in ids
    ]
    assert values[:2] == [None, None] and values[2:] == [1002.0, 1003.0, 1004.0]
    exposed = httpx.get(f"http://127.0.0.1:{pg_coordinator.http_port}/metrics").text
    assert "secret-ish" not in exposed
