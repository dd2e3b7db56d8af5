"""The coordinator over real gRPC with a lightweight test worker that speaks the real
protocol and sends real tensors (no model): a full round, every upload rejection path,
idempotent re-upload. Each rejection names the problem and stores nothing."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import grpc
import numpy as np
import pytest

from fedpilot.coordinator.db.store import Store
from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.core.aggregation import flatten
from fedpilot.v1 import coordinator_pb2, errors_pb2, profile_pb2, transfer_pb2
from fedpilot.wire import encode_tensors, error_detail_from_rpc_error, iter_chunks
from fedpilot.wire.payload import tensor_specs
from fedpilot.worker.client import CoordinatorClient

SHAPES = {
    "enc.1.q": {"lora_A": (2, 4), "lora_B": (4, 2)},
    "enc.2.q": {"lora_A": (2, 4), "lora_B": (4, 2)},
    "head": {"weight": (3, 4), "bias": (3,)},
}
LAYERS = {"enc.1.q": 1, "enc.2.q": 2, "head": 0}
BASE, MODULE_BYTES = 1000, 10


def _tensors(modules, value: float = 0.5, dtype=np.float32) -> dict[str, np.ndarray]:
    return flatten(
        {m: {p: np.full(SHAPES[m][p], value, dtype) for p in SHAPES[m]} for m in modules}
    )


def _profile() -> profile_pb2.MemoryProfile:
    return profile_pb2.MemoryProfile(
        base_bytes=BASE,
        layer_activation_bytes=[100, 100],
        budget_bytes=BASE + MODULE_BYTES,
        modules=[
            profile_pb2.ModuleCost(name=m, layer=LAYERS[m], param_bytes=MODULE_BYTES)
            for m in SHAPES
        ],
        tensors=tensor_specs(_tensors(SHAPES)),
        device="test",
    )


def _poll(client: CoordinatorClient, kind: int, timeout_s: float = 20) -> coordinator_pb2.Task:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = client.poll_task(500)
        if task is not None and task.kind == kind:
            return task
    raise AssertionError("no task arrived")


@pytest.fixture()
def running(database_url: str, tmp_path: Path) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, grpc_port=0, tick_seconds=0.05
    )
    coordinator = start(settings)
    yield coordinator
    coordinator.stop()


@pytest.fixture()
def round_ready(running: RunningCoordinator):
    """A registered test worker holding a TRAIN task that assigns only the head."""
    store: Store = running.store
    client = CoordinatorClient(f"127.0.0.1:{running.port}")
    client.register("test-worker", budget_bytes=BASE + MODULE_BYTES)
    job_id = store.create_job(
        "svc",
        {
            "rounds": 1,
            "min_workers": 1,
            "round_deadline_s": 60,
            "quorum": 1.0,
            "ig_probe_batches": 0,
            "lora": {"rank": 2, "target_modules": ["q"]},
        },
    )
    task = _poll(client, coordinator_pb2.TASK_KIND_PROFILE)
    client.report_profile(job_id, task.task_id, _profile())
    task = _poll(client, coordinator_pb2.TASK_KIND_TRAIN)
    yield store, client, job_id, task
    client.close()


def test_the_last_profile_report_starts_training_without_waiting_for_a_tick(
    database_url: str, tmp_path: Path
) -> None:
    """The driver ticks every 60 s here: the training task must come from the wake-up
    that the last awaited profile report gives the driver, not from a tick."""
    settings = CoordinatorSettings(
        data_dir=tmp_path, database_url=database_url, grpc_port=0, tick_seconds=60
    )
    coordinator = start(settings)
    client = CoordinatorClient(f"127.0.0.1:{coordinator.port}")
    try:
        client.register("w", budget_bytes=BASE + MODULE_BYTES)
        job_id = coordinator.store.create_job(
            "wake",
            {
                "rounds": 1,
                "min_workers": 1,
                "ig_probe_batches": 0,
                "lora": {"rank": 2, "target_modules": ["q"]},
            },
        )
        coordinator.driver.signals.upload_accepted()  # a poke: see the new job now
        task = _poll(client, coordinator_pb2.TASK_KIND_PROFILE, timeout_s=20)
        client.report_profile(job_id, task.task_id, _profile())
        task = _poll(client, coordinator_pb2.TASK_KIND_TRAIN, timeout_s=20)
        assert task.job_id == job_id and task.round == 1
    finally:
        client.close()
        coordinator.stop()


def _manifest(task: coordinator_pb2.Task, **changes) -> transfer_pb2.UpdateManifest:
    fields = {
        "job_id": task.job_id,
        "round": task.round,
        "task_id": task.task_id,
        "num_samples": 10,
        "train_loss_before": 1.0,
        "train_loss_after": 0.5,
    }
    fields.update(changes)
    return transfer_pb2.UpdateManifest(**fields)


def _reason(call) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    detail = error_detail_from_rpc_error(e.value)
    assert detail is not None and detail.message, e.value
    return errors_pb2.ErrorReason.Name(detail.reason)


def _raw_upload(client: CoordinatorClient, manifest, data: bytes, chunk: int = 64):
    manifest.worker_id = client.worker_id

    def messages():
        yield transfer_pb2.UploadUpdateRequest(manifest=manifest)
        for part in iter_chunks(data, chunk):
            yield transfer_pb2.UploadUpdateRequest(data=part)

    return client._stub.UploadUpdate(messages(), metadata=client._metadata(), timeout=10)


def test_a_full_round_with_every_rejection_path(round_ready, tmp_path: Path) -> None:
    store, client, job_id, task = round_ready
    assert list(task.modules) == ["head"]  # the budget fits the head only
    _, adapter = client.download_adapter(job_id, task.adapter_version)
    assert set(adapter) == set(_tensors(SHAPES))
    good = _tensors(["head"])

    cases = {
        "ERROR_REASON_WRONG_ROUND": lambda: client.upload_update(_manifest(task, round=7), good),
        "ERROR_REASON_MODULE_NOT_ASSIGNED": lambda: client.upload_update(
            _manifest(task), {**good, **_tensors(["enc.1.q"])}
        ),
        "ERROR_REASON_UNKNOWN_TENSOR": lambda: client.upload_update(
            _manifest(task), {**good, "head/extra": np.zeros(2, np.float32)}
        ),
        "ERROR_REASON_SHAPE_MISMATCH": lambda: client.upload_update(
            _manifest(task), {**good, "head/bias": np.zeros(4, np.float32)}
        ),
        "ERROR_REASON_DTYPE_MISMATCH": lambda: client.upload_update(
            _manifest(task), _tensors(["head"], dtype=np.float16)
        ),
        "ERROR_REASON_NON_FINITE": lambda: client.upload_update(
            _manifest(task), {**good, "head/bias": np.array([0, np.nan, 0], np.float32)}
        ),
        "ERROR_REASON_NOT_ASSIGNED": lambda: client.upload_update(
            _manifest(task, task_id="not-a-task"), good
        ),
        "ERROR_REASON_MALFORMED": lambda: client.upload_update(
            _manifest(task, num_samples=0), good
        ),
    }
    data, payload = encode_tensors(good)
    lying = _manifest(
        task,
        payload=transfer_pb2.PayloadManifest(
            tensors=payload.tensors, total_bytes=payload.total_bytes, sha256="0" * 64
        ),
    )
    short = _manifest(task, payload=payload)
    huge = _manifest(
        task,
        payload=transfer_pb2.PayloadManifest(
            tensors=payload.tensors, total_bytes=1 << 40, sha256=payload.sha256
        ),
    )
    cases |= {
        "ERROR_REASON_CHECKSUM_MISMATCH": lambda: _raw_upload(client, lying, data),
        "ERROR_REASON_TRUNCATED": lambda: _raw_upload(client, short, data[:-8]),
        "ERROR_REASON_STREAM_TOO_LARGE": lambda: _raw_upload(client, huge, data),
    }
    for expected, call in cases.items():
        assert _reason(call) == expected
    # A forged token is refused before anything else.
    impostor = CoordinatorClient(client.target)
    impostor.authenticate(client.worker_id, "forged-token")
    assert (
        _reason(lambda: impostor.upload_update(_manifest(task), good)) == "ERROR_REASON_BAD_TOKEN"
    )
    impostor.close()

    # Nothing of any of that was stored, not even a staged file; each refusal was
    # recorded with its reason.
    assert store.updates(job_id, task.round) == []
    assert not list((tmp_path / "blobs").rglob(".tmp-*")), "a refused upload left a file"
    recorded = {r.reason for r in store.rejections(job_id)}
    assert set(cases) - {"ERROR_REASON_NOT_ASSIGNED"} <= recorded

    # The real upload counts once, however often it is sent.
    first = client.upload_update(_manifest(task), good)
    again = client.upload_update(_manifest(task), good)
    assert not first.duplicate and again.duplicate and again.update_id == first.update_id
    (update,) = store.updates(job_id, task.round)
    assert update.sha256 == hashlib.sha256(encode_tensors(good)[0]).hexdigest()

    # The round closes and the job finishes with the update in version 1.
    deadline = time.monotonic() + 20
    while store.job(job_id).state != "done" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.job(job_id).state == "done", store.job(job_id).error
    _, v1 = client.download_adapter(job_id, 1)
    np.testing.assert_allclose(v1["head/weight"], 0.5)
    np.testing.assert_array_equal(v1["enc.1.q/lora_A"], adapter["enc.1.q/lora_A"])
    # A retry that arrives after the round closed is still acknowledged, not counted.
    assert client.upload_update(_manifest(task), good).duplicate
    assert len(store.updates(job_id, task.round)) == 1


def test_a_small_adapter_rides_with_its_training_task(round_ready) -> None:
    """A global adapter within the inline limit comes inside the training task, the same
    manifest and bytes DownloadAdapter sends, so the worker makes no download call."""
    from fedpilot.coordinator.service import INLINE_ADAPTER_BYTES

    _, client, job_id, task = round_ready
    assert task.HasField("adapter") and len(task.adapter_data) <= INLINE_ADAPTER_BYTES
    manifest, downloaded = client.download_adapter(job_id, task.adapter_version)
    assert task.adapter == manifest
    assert hashlib.sha256(task.adapter_data).hexdigest() == manifest.payload.sha256
    calls: list[str] = []
    original = client.download_adapter
    client.download_adapter = lambda *a, **k: calls.append("download") or original(*a, **k)
    inline_manifest, inline = client.adapter_for(task)
    assert calls == [] and inline_manifest == manifest
    assert set(inline) == set(downloaded)
    for name, value in downloaded.items():
        np.testing.assert_array_equal(inline[name], value)


def test_uploads_carry_blake3_once_the_coordinator_names_it(round_ready) -> None:
    """Download manifests carry both digests; the client then uploads with BLAKE3 alone,
    the coordinator checks it and still stores the blob under its sha256."""
    store, client, job_id, task = round_ready
    assert client.upload_checksum == "sha256"
    manifest, adapter = client.download_adapter(job_id, task.adapter_version)
    stored, _ = encode_tensors(adapter)  # the coordinator's encoding of the same tensors
    assert manifest.payload.sha256 == hashlib.sha256(stored).hexdigest()
    assert manifest.payload.blake3 == blake3.blake3(bytes(stored)).hexdigest()
    assert client.upload_checksum == "blake3"

    good = _tensors(["head"])
    data, payload = encode_tensors(good, "blake3")
    assert payload.blake3 and not payload.sha256
    lying = transfer_pb2.PayloadManifest(
        tensors=payload.tensors, total_bytes=payload.total_bytes, blake3="0" * 64
    )
    with pytest.raises(grpc.RpcError) as e:
        _raw_upload(client, _manifest(task, payload=lying), data)
    detail = error_detail_from_rpc_error(e.value)
    assert errors_pb2.ErrorReason.Name(detail.reason) == "ERROR_REASON_CHECKSUM_MISMATCH"
    assert detail.field == "manifest.blake3"
    assert store.updates(job_id, task.round) == []

    client.upload_update(_manifest(task), good)
    (update,) = store.updates(job_id, task.round)
    assert update.sha256 == hashlib.sha256(data).hexdigest()


def test_health_and_reflection_answer(running: RunningCoordinator) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="fedpilot.v1.Coordinator"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in answer.list_services_response.service}
    assert "fedpilot.v1.Coordinator" in names
    channel.close()


def test_a_long_poll_waits_without_waking_and_ends_when_its_client_goes(
    running: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiting poll sleeps until tasks come, its wait runs out or its caller cancels:
    no timer wakes it to look (at 2,000 waiting polls those wake-ups starved the
    thread that accepts new calls), and a cancelled poll frees its handler at once,
    not at the end of its wait."""
    signals = running.driver.signals
    waits: list[float] = []
    returned = threading.Event()
    original = signals.tasks_after

    async def counted(seen: int, timeout: float, wake: asyncio.Event) -> int:
        waits.append(timeout)
        try:
            return await original(seen, timeout, wake)
        finally:
            returned.set()

    monkeypatch.setattr(signals, "tasks_after", counted)
    client = CoordinatorClient(f"127.0.0.1:{running.port}")
    client.register("waiting-worker", budget_bytes=BASE + MODULE_BYTES)
    assert client.poll_task(1_500) is None
    assert len(waits) == 1 and waits[0] > 1.0, f"the poll woke to look: waits {waits}"

    waits.clear()
    returned.clear()
    future = client._stub.PollTask.future(
        coordinator_pb2.PollTaskRequest(worker_id=client.worker_id, wait_ms=20_000),
        metadata=client._metadata(),
        timeout=60,
    )
    deadline = time.monotonic() + 10
    while not waits and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waits, "the poll never waited"
    future.cancel()
    # Well inside the poll's own 20 s: the handler ended because its caller went.
    assert returned.wait(10), "a cancelled poll kept its handler until its wait ran out"
    assert len(waits) == 1


def test_polls_woken_together_answer_in_a_wave_and_each_gets_its_task(
    running: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New tasks wake every waiting poll at once; each asks for its place in a wave of
    that size at the configured rate, waits it, and still answers with its task."""
    from fedpilot.coordinator import service

    asked: list[tuple[int, float]] = []

    def recorded(woken: int, per_s: float) -> float:
        asked.append((woken, per_s))
        return 0.2

    monkeypatch.setattr(service, "wave_delay", recorded)
    clients = [CoordinatorClient(f"127.0.0.1:{running.port}") for _ in range(3)]
    for i, client in enumerate(clients):
        client.register(f"wave-{i}", budget_bytes=BASE + MODULE_BYTES)
    with ThreadPoolExecutor(3) as pool:
        polls = [pool.submit(c.poll_task, 20_000) for c in clients]
        signals = running.driver.signals
        deadline = time.monotonic() + 10
        while len(signals._waiters) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        running.store.create_job(
            "wave",
            {
                "rounds": 1,
                "min_workers": 3,
                "ig_probe_batches": 0,
                "lora": {"rank": 2, "target_modules": ["q"]},
            },
        )
        tasks = [p.result(timeout=30) for p in polls]
    assert all(t is not None and t.kind == coordinator_pb2.TASK_KIND_PROFILE for t in tasks)
    assert (3, running.driver.settings.task_wave_per_s) in asked
    for client in clients:
        client.close()


def test_an_idle_worker_polling_again_costs_no_query_until_tasks_are_created(
    running: RunningCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll that found nothing vouches for the next ones while no task was created, and
    so does registering (a task for a worker can only come after it); the task the
    driver creates afterwards is still found at once."""
    store: Store = running.store
    queries: list[str] = []
    original = store.offered_task

    def counted(worker_id: str):  # type: ignore[no-untyped-def]
        queries.append(worker_id)
        return original(worker_id)

    monkeypatch.setattr(store, "offered_task", counted)
    client = CoordinatorClient(f"127.0.0.1:{running.port}")
    client.register("idle-worker", budget_bytes=BASE + MODULE_BYTES)
    for _ in range(3):
        assert client.poll_task(50) is None
    assert queries == [], "a new worker's polls queried the database with no task created"
    store.create_job(
        "idle",
        {
            "rounds": 1,
            "min_workers": 1,
            "ig_probe_batches": 0,
            "lora": {"rank": 2, "target_modules": ["q"]},
        },
    )
    task = _poll(client, coordinator_pb2.TASK_KIND_PROFILE)
    assert task.task_id and queries
    client.close()


def test_a_worker_polling_sends_no_heartbeats_and_stays_alive(running: RunningCoordinator) -> None:
    """The coordinator says an open poll keeps a worker alive; its client then sends no
    heartbeat while one is open, and the driver still counts it (a timeout of 1 s,
    several times shorter than the poll)."""
    client = CoordinatorClient(f"127.0.0.1:{running.port}")
    client.register("polling-worker", budget_bytes=BASE + MODULE_BYTES)
    assert client.poll_keeps_alive and client.heartbeat_needed
    assert client.heartbeat().poll_keeps_alive
    future = client.poll_task_future(4_000)
    try:
        deadline = time.monotonic() + 10
        while client.worker_id not in running.store._polls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not client.heartbeat_needed
        time.sleep(2.5)  # 2.5 timeouts of silence, every beat from the poll alone
        assert running.store.alive_worker_ids(1.0) == {client.worker_id}
    finally:
        future.cancel()
    deadline = time.monotonic() + 10
    while not client.heartbeat_needed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.heartbeat_needed  # the poll ended: beating again
    client.close()
