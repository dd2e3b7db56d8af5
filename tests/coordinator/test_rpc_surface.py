"""A property test over every worker-facing RPC: an authenticated (enrolled) worker sends
arbitrary ids, numbers, strings, maps and shapes. After each call the coordinator has
answered with a status other than INTERNAL/UNKNOWN, the round driver is alive and has
not failed, and at the end an honest worker's concurrent job has finished."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.v1 import coordinator_pb2, coordinator_pb2_grpc, errors_pb2, profile_pb2, transfer_pb2
from fedpilot.worker.client import CoordinatorClient
from tests.coordinator.test_service import BASE, MODULE_BYTES, SHAPES, _manifest, _profile, _tensors

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
METHODS = [
    "Register",
    "Heartbeat",
    "ReportProfile",
    "PollTask",
    "RefuseTask",
    "DownloadAdapter",
    "UploadUpdate",
]
TENSOR_NAMES = sorted(_tensors(SHAPES))

u64 = st.one_of(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.sampled_from([0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]),
)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
small_int = st.integers(min_value=0, max_value=60)
doubles = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\x00", "a\x00b", "x" * 37, "y" * 300]),
)
string_maps = st.dictionaries(texts, texts, max_size=4)
shapes = st.lists(u64, max_size=5)


def _tensor_specs() -> st.SearchStrategy[list[transfer_pb2.TensorSpec]]:
    spec = st.builds(
        transfer_pb2.TensorSpec,
        name=st.one_of(st.sampled_from(TENSOR_NAMES), texts),
        shape=st.one_of(shapes, st.sampled_from([list(s) for s in _shapes()])),
        dtype=st.integers(min_value=0, max_value=5),
    )
    return st.lists(spec, max_size=6)


def _shapes() -> list[tuple[int, ...]]:
    return [tuple(v.shape) for v in _tensors(SHAPES).values()]


@dataclass
class Surface:
    coordinator: RunningCoordinator
    mallory: CoordinatorClient
    honest: CoordinatorClient
    job_id: str
    stub: coordinator_pb2_grpc.CoordinatorStub
    seen: list[str] = field(default_factory=list)

    def ids(self) -> list[str]:
        store = self.coordinator.store
        job = store.job(self.job_id)
        tasks = store.tasks(self.job_id, job.current_round) if job else []
        return [self.mallory.worker_id, self.honest.worker_id, self.job_id] + [t.id for t in tasks]


def _honest_loop(client: CoordinatorClient, job_id: str, stop: threading.Event) -> None:
    """A well-behaved worker: profile when asked, upload the assigned modules."""
    while not stop.is_set():
        try:
            task = client.poll_task(200)
            if task is None:
                continue
            if task.kind == coordinator_pb2.TASK_KIND_PROFILE:
                client.report_profile(task.job_id, task.task_id, _profile())
            elif task.kind == coordinator_pb2.TASK_KIND_TRAIN:
                client.upload_update(_manifest(task), _tensors(list(task.modules)))
        except grpc.RpcError:
            time.sleep(0.1)


@pytest.fixture()
def surface(tmp_path: Path, pg_schema_url: str) -> Iterator[Surface]:
    coordinator = start(
        CoordinatorSettings(
            data_dir=tmp_path,
            database_url=pg_schema_url,
            grpc_port=0,
            tick_seconds=0.05,
            heartbeat_timeout_s=3,
            max_poll_wait_ms=100,
            stream_idle_timeout_s=5,
        )
    )
    target = f"127.0.0.1:{coordinator.port}"
    honest = CoordinatorClient(target, timeout_s=10)
    honest.register("honest", budget_bytes=BASE + MODULE_BYTES)
    job_id = coordinator.store.create_job(
        "under-fire",
        {
            "rounds": 3,
            "min_workers": 1,
            "quorum": 0.5,
            "round_deadline_s": 10,
            "profile_deadline_s": 3,
            "ig_probe_batches": 0,
            "lora": {"rank": 2, "target_modules": ["q"]},
        },
    )
    stop = threading.Event()
    loop = threading.Thread(target=_honest_loop, args=(honest, job_id, stop), daemon=True)
    loop.start()
    mallory = CoordinatorClient(target, timeout_s=10)
    mallory.register("mallory", budget_bytes=1 << 40)
    channel = grpc.insecure_channel(target)
    yield Surface(
        coordinator, mallory, honest, job_id, coordinator_pb2_grpc.CoordinatorStub(channel)
    )
    stop.set()
    loop.join(timeout=10)
    channel.close()
    mallory.close()
    honest.close()
    coordinator.stop(grace=0.2)


def _internal_errors() -> float:
    return sum(
        s.value
        for metric in REGISTRY.collect()
        if metric.name == "fedpilot_internal_errors"
        for s in metric.samples
        if s.name.endswith("_total")
    )


def _call(surface: Surface, data: st.DataObject, method: str) -> None:
    """Draw the fields of one ``method`` call and send it as mallory."""
    known = surface.ids()  # a live id (a worker's, the job's, a task's) or any text
    ids = st.one_of(st.integers(min_value=0, max_value=7), texts).map(
        lambda x: known[x % len(known)] if isinstance(x, int) else x
    )
    own = st.just(surface.mallory.worker_id)
    worker_ids = st.one_of(own, own, own, ids)  # mostly her own: past authentication
    job = st.just(surface.job_id)
    job_ids = st.one_of(job, job, ids)
    meta = surface.mallory._metadata()
    stub = surface.stub
    kw = {"metadata": meta, "timeout": 10}
    if method == "Register":
        request = coordinator_pb2.RegisterRequest(
            name=data.draw(texts),
            labels=data.draw(string_maps),
            device=coordinator_pb2.DeviceInfo(
                kind=data.draw(texts),
                name=data.draw(texts),
                total_memory_bytes=data.draw(u64),
                free_memory_bytes=data.draw(u64),
            ),
            budget_bytes=data.draw(u64),
            enrollment_secret=data.draw(texts),
        )
        stub.Register(request, **kw)
    elif method == "Heartbeat":
        stub.Heartbeat(
            coordinator_pb2.HeartbeatRequest(
                worker_id=data.draw(worker_ids),
                state=data.draw(st.integers(min_value=0, max_value=9)),
                task_id=data.draw(ids),
            ),
            **kw,
        )
    elif method == "ReportProfile":
        modules = st.builds(
            profile_pb2.ModuleCost,
            name=st.one_of(st.sampled_from(sorted(SHAPES)), texts),
            layer=st.one_of(st.integers(0, 3), u32),
            param_bytes=u64,
            extra_bytes=u64,
        )
        profile = data.draw(
            st.one_of(
                st.just(_profile()),
                st.builds(
                    profile_pb2.MemoryProfile,
                    config_key=texts,
                    base_bytes=u64,
                    layer_activation_bytes=st.lists(u64, max_size=4),
                    modules=st.lists(modules, max_size=5),
                    budget_bytes=u64,
                    method=st.integers(0, 5),
                    device=texts,
                    tensors=_tensor_specs(),
                ),
            )
        )
        stub.ReportProfile(
            coordinator_pb2.ReportProfileRequest(
                worker_id=data.draw(worker_ids),
                job_id=data.draw(job_ids),
                task_id=data.draw(ids),
                profile=profile,
            ),
            **kw,
        )
    elif method == "PollTask":
        stub.PollTask(
            coordinator_pb2.PollTaskRequest(
                worker_id=data.draw(worker_ids), wait_ms=data.draw(u32)
            ),
            **kw,
        )
    elif method == "RefuseTask":
        stub.RefuseTask(
            coordinator_pb2.RefuseTaskRequest(
                worker_id=data.draw(worker_ids),
                task_id=data.draw(ids),
                reason=errors_pb2.ErrorDetail(
                    reason=data.draw(st.integers(0, 100)),
                    message=data.draw(texts),
                    field=data.draw(texts),
                    metadata=data.draw(string_maps),
                ),
            ),
            **kw,
        )
    elif method == "DownloadAdapter":
        for _ in stub.DownloadAdapter(
            coordinator_pb2.DownloadAdapterRequest(
                worker_id=data.draw(worker_ids), job_id=data.draw(job_ids), version=data.draw(u64)
            ),
            **kw,
        ):
            pass
    else:
        manifest = transfer_pb2.UpdateManifest(
            worker_id=data.draw(worker_ids),
            job_id=data.draw(job_ids),
            round=data.draw(st.one_of(st.integers(0, 4), u64)),
            task_id=data.draw(ids),
            base_version=data.draw(u64),
            payload=transfer_pb2.PayloadManifest(
                tensors=data.draw(_tensor_specs()),
                total_bytes=data.draw(st.one_of(st.integers(0, 4096), u64)),
                sha256=data.draw(
                    st.one_of(texts, st.text("0123456789abcdef", min_size=64, max_size=64))
                ),
            ),
            num_samples=data.draw(u64),
            train_loss_before=data.draw(doubles),
            train_loss_after=data.draw(doubles),
            local_scores=data.draw(st.dictionaries(texts, doubles, max_size=4)),
            predicted_peak_bytes=data.draw(u64),
            measured_peak_bytes=data.draw(u64),
            train_seconds=data.draw(doubles),
        )
        chunks = data.draw(st.lists(st.binary(max_size=2048), max_size=4))
        shape = data.draw(st.sampled_from(["manifest first", "data first", "two manifests"]))
        messages = [transfer_pb2.UploadUpdateRequest(data=c) for c in chunks]
        head = transfer_pb2.UploadUpdateRequest(manifest=manifest)
        if shape == "manifest first":
            messages = [head, *messages]
        elif shape == "two manifests":
            messages = [head, *messages, head]
        stub.UploadUpdate(iter(messages), **kw)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def _fuzz(surface: Surface, data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(METHODS))
    try:
        _call(surface, data, method)
        surface.seen.append(f"{method}:OK")
    except grpc.RpcError as e:
        assert e.code() not in FORBIDDEN, (e.code(), e.details())
        surface.seen.append(f"{method}:{e.code().name}")
    running = surface.coordinator
    assert running.thread.is_alive()
    assert running.driver.errors == 0


def test_the_worker_facing_surface_survives_arbitrary_fields(surface: Surface) -> None:
    internal_before = _internal_errors()
    _fuzz(surface)
    assert _internal_errors() == internal_before
    # Most calls must have got past authentication into the handlers' own checks.
    codes = set(surface.seen)
    assert {c.split(":")[1] for c in codes} & {"INVALID_ARGUMENT", "PERMISSION_DENIED"}, codes
    store = surface.coordinator.store
    deadline = time.monotonic() + 120
    while store.job(surface.job_id).state not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, store.job(surface.job_id)
        time.sleep(0.2)
    job = store.job(surface.job_id)
    assert job.state == "done", job.error
    assert surface.coordinator.driver.errors == 0
