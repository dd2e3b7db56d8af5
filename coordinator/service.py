"""The fedpilot.v1 Coordinator service: authentication, validation, then the store.

Each method checks who is calling and whether the request fits the job's
state before anything is written. A refused request gets a gRPC status whose
ErrorDetail names the problem, is recorded as a rejection, and changes nothing
else. Uploads are verified completely (manifest against the assignment and
the global adapter, sizes, checksum, finiteness) before their blob and row
are committed.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn, TypeVar

import grpc

from fedpilot.coordinator import metrics, modelcheck
from fedpilot.coordinator import validate as check
from fedpilot.coordinator.adapter_shapes import (
    AdapterBounds,
    check_shapes,
    first_difference,
    model_max_dim,
)
from fedpilot.coordinator.aio import run_blocking, wait_event
from fedpilot.coordinator.cadence import HeartbeatCadence, wave_delay
from fedpilot.coordinator.db.blobs import BlobStore, BlobWriter
from fedpilot.coordinator.db.models import Update, Worker
from fedpilot.coordinator.db.store import (
    AuthError,
    Store,
    TaskClosed,
    TaskOffer,
    TaskState,
    UpdateRecord,
    UploadTarget,
)
from fedpilot.coordinator.guard import bearer_token
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.coordinator.ratelimit import TokenBucket
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.coordinator.signals import Signals
from fedpilot.core.aggregation import SEPARATOR
from fedpilot.core.memory import memory_to_json
from fedpilot.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    errors_pb2,
    profile_pb2,
    transfer_pb2,
)
from fedpilot.wire import MAX_CHUNK_BYTES, PayloadReceiver, WireError, rich_status
from fedpilot.wire.payload import (
    Buffer,
    decode_tensors,
    dtype_name,
    new_hasher,
    tensor_specs,
    wire_dtype,
)
from fedpilot.wire.serde import memory_from_proto

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATES = {
    coordinator_pb2.WORKER_STATE_IDLE: "idle",
    coordinator_pb2.WORKER_STATE_PROFILING: "profiling",
    coordinator_pb2.WORKER_STATE_TRAINING: "training",
    coordinator_pb2.WORKER_STATE_UPLOADING: "uploading",
}
EMPTY_POLL_TRUST_S = 30.0
"""How long a poll that found no task vouches for the worker's next polls (see
:meth:`CoordinatorService._known_empty`)."""

MAX_REMEMBERED_POLLS = 100_000
"""Workers whose last empty poll is remembered; past it the memory starts over."""

INLINE_ADAPTER_BYTES = 512 << 10
"""A global adapter up to this size is sent inside each training task, so its worker
needs no DownloadAdapter call (a third of a small adapter's calls per worker-round,
docs/benchmarks.md, "Load"). Half a message: the task's other fields stay well inside
gRPC's message limit."""

POLL_QUERY_SLOTS = 8
"""Long polls that query the database at once. Tasks wake every waiting poll together
(2,000 at 2,000 workers); the rest wait their turn here, well under the connection
pool's 30, so the round driver and uploads always find a connection."""

_KINDS = {"profile": coordinator_pb2.TASK_KIND_PROFILE, "train": coordinator_pb2.TASK_KIND_TRAIN}


def _error(reason: int, message: str, field: str = "") -> WireError:
    return WireError(reason, message, field)


def job_config(spec: JobSpec) -> coordinator_pb2.JobConfig:
    return coordinator_pb2.JobConfig(
        model=spec.model,
        task=spec.task,
        num_labels=spec.num_labels,
        lora_rank=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        batch_size=spec.batch_size,
        max_seq_len=spec.max_seq_len,
        dtype=spec.dtype,
        learning_rate=spec.learning_rate,
        weight_decay=spec.weight_decay,
        local_steps=spec.local_steps,
        local_epochs=spec.local_epochs,
        ig_probe_batches=spec.ig_probe_batches,
        seed=spec.seed,
        dataset=spec.dataset,
        label_names=spec.labels,
        payload_dtype=spec.payload_dtype,
    )


def profile_row(
    msg: profile_pb2.MemoryProfile, bounds: AdapterBounds | None = None
) -> dict[str, Any]:
    """Validate a reported profile and turn it into the stored form."""
    if len(msg.modules) > (bounds.max_tensors if bounds else 100_000):
        raise check.malformed(f"profile lists {len(msg.modules)} modules", "profile.modules")
    check.count(msg.base_bytes, "profile.base_bytes")
    check.count(msg.budget_bytes, "profile.budget_bytes")
    check.text(msg.device, "profile.device", max_chars=200)
    check.text(msg.config_key, "profile.config_key", max_chars=1000)
    if len(msg.layer_activation_bytes) > 10_000:
        raise check.malformed(
            "profile lists more than 10000 layers", "profile.layer_activation_bytes"
        )
    for i, a in enumerate(msg.layer_activation_bytes):
        check.count(a, f"profile.layer_activation_bytes[{i}]")
    for m in msg.modules:
        check.text(m.name, "profile.modules.name", max_chars=300, required=True)
        check.count(m.param_bytes, f"profile.modules[{m.name}].param_bytes")
        check.count(m.extra_bytes, f"profile.modules[{m.name}].extra_bytes")
    try:
        memory = memory_from_proto(msg)
    except ValueError as e:
        raise _error(errors_pb2.ERROR_REASON_MALFORMED, f"invalid profile: {e}", "profile") from e
    names = set(memory.module_names)
    tensors: dict[str, list[int]] = {}
    for t in msg.tensors:
        check.text(t.name, "profile.tensors.name", max_chars=400, required=True)
        module, sep, _ = t.name.rpartition(SEPARATOR)
        if not sep or module not in names:
            raise _error(
                errors_pb2.ERROR_REASON_MALFORMED,
                f"profile tensor {t.name!r} does not belong to a profiled module",
                "profile.tensors",
            )
        tensors[t.name] = list(t.shape)
    missing = names - {n.rpartition(SEPARATOR)[0] for n in tensors}
    if missing:
        raise _error(
            errors_pb2.ERROR_REASON_MALFORMED,
            f"profile lists no tensors for modules {sorted(missing)[:5]}",
            "profile.tensors",
        )
    if bounds is not None:
        check_shapes(tensors, bounds)
    return {
        "memory": memory_to_json(memory),
        "tensors": tensors,
        "budget_bytes": msg.budget_bytes,
        "method": profile_pb2.ProfileMethod.Name(msg.method),
        "device": msg.device,
    }


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    """Thin transport: every method authenticates, validates and delegates to the store."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        settings: CoordinatorSettings,
        signals: Signals,
        cadence: HeartbeatCadence,
    ) -> None:
        """``cadence``: shared with the round driver, which keeps it current."""
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.signals = signals
        self.cadence = cadence
        self.registrations = TokenBucket(settings.registrations_per_s, settings.registration_burst)
        self._manifests: dict[tuple[str, int], tuple[transfer_pb2.AdapterManifest, str]] = {}
        """Per (job, version): its manifest as sent to workers, and its blob's sha256."""
        self._inline: dict[str, bytes] = {}
        """Bytes of the latest small versions, sent inside training tasks."""
        self._shape_cache: dict[str, dict[str, list[int]]] = {}
        self._bounds: dict[str, AdapterBounds] = {}
        self._specs: dict[str, JobSpec] = {}
        self._empty_polls: dict[str, tuple[int, float]] = {}
        """Per worker, the task epoch and time of its last poll that found no task."""
        self._poll_queries = asyncio.Semaphore(POLL_QUERY_SLOTS)
        self.blocking = ThreadPoolExecutor(settings.grpc_threads, thread_name_prefix="blocking")
        """Runs what would stall the event loop: queries, blob reads, checks of uploads."""
        metrics.WORKERS.limit = settings.metrics_max_workers

    # -- helpers -----------------------------------------------------------------------------

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the blocking threads (see :func:`run_blocking`)."""
        return await run_blocking(self.blocking, fn, *args)

    async def _reject(
        self,
        context: grpc.aio.ServicerContext,
        error: WireError,
        *,
        job_id: str | None = None,
        round_number: int | None = None,
        worker_id: str | None = None,
    ) -> NoReturn:
        metrics.REJECTIONS.labels(reason=error.reason_name).inc()
        try:
            await self._blocking(
                functools.partial(
                    self.store.record_rejection,
                    error.reason_name,
                    error.message,
                    job_id=job_id,
                    round_number=round_number,
                    worker_id=worker_id,
                )
            )
        except Exception:  # the caller must still get its answer
            log.exception("could not record a rejection")
        log.info("rejected %s: %s", error.reason_name, error.message)
        await context.abort_with_status(rich_status(error))
        raise AssertionError("unreachable: abort raises")

    async def _worker(self, context: grpc.aio.ServicerContext, worker_id: str) -> Worker:
        token = bearer_token(context)
        try:
            known = self.store.known_worker(worker_id, token)
            return known or await self._blocking(self.store.authenticate, worker_id, token)
        except AuthError:
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_BAD_TOKEN,
                    "unknown worker or bad token",
                    "authorization",
                ),
                worker_id=None,
            )

    async def _own_task(
        self, context: grpc.aio.ServicerContext, worker: Worker, task_id: str
    ) -> TaskState:
        task = await self._blocking(self.store.task_state, task_id)
        if task is None or task.worker_id != worker.id:
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_NOT_ASSIGNED,
                    f"task {task_id!r} is not assigned to this worker",
                    "task_id",
                ),
                worker_id=worker.id,
            )
        assert task is not None
        return task

    def _spec(self, job_id: str) -> JobSpec | None:
        """A job's parsed spec, cached: a spec never changes after submission, and parsing
        it on every poll, download and upload cost more than the RPC itself at 500 workers."""
        spec = self._specs.get(job_id)
        if spec is None:
            job = self.store.job(job_id)
            if job is None:
                return None
            spec = JobSpec.model_validate(job.spec)
            if len(self._specs) >= 1024:
                self._specs.clear()
            self._specs[job_id] = spec
        return spec

    def _adapter_bounds(self, job_id: str) -> AdapterBounds:
        """What the job's model and spec allow an adapter to be (fixed for the job)."""
        bounds = self._bounds.get(job_id)
        if bounds is None:
            spec = self._spec(job_id)
            if spec is None:
                raise _error(errors_pb2.ERROR_REASON_UNKNOWN_JOB, "unknown job", "job_id")
            bounds = AdapterBounds(
                rank=spec.lora.rank,
                target_modules=tuple(spec.lora.target_modules),
                max_dim=model_max_dim(modelcheck.model_config(spec), self.settings.max_tensor_dim),
                max_bytes=self.settings.max_adapter_bytes,
                max_tensors=self.settings.max_profile_modules,
            )
            if len(self._bounds) >= 1024:
                self._bounds.clear()
            self._bounds[job_id] = bounds
        return bounds

    def _shapes(self, job_id: str) -> dict[str, list[int]]:
        """Tensor shapes of the job's global adapter (fixed for the job's lifetime)."""
        shapes = self._shape_cache.get(job_id)
        if shapes is None:
            version = self.store.latest_version(job_id)
            if version is None:
                raise _error(
                    errors_pb2.ERROR_REASON_UNKNOWN_ADAPTER_VERSION,
                    f"job {job_id!r} has no global adapter yet",
                    "job_id",
                )
            with self.blobs.mapped(version.sha256) as data:
                shapes = {k: list(v.shape) for k, v in decode_tensors(data).items()}
            self._shape_cache[job_id] = shapes
        return shapes

    # -- RPCs --------------------------------------------------------------------------------

    async def Register(
        self, request: coordinator_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RegisterResponse:
        if not self.registrations.take():
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_RATE_LIMITED,
                    f"too many registrations (at most {self.settings.registrations_per_s:g}/s "
                    "sustained); retry later",
                    "name",
                ),
            )
        secret = self.settings.enrollment_secret.get_secret_value()
        if secret and not hmac.compare_digest(secret, request.enrollment_secret):
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_ENROLLMENT_REFUSED,
                    "enrollment secret refused",
                    "enrollment_secret",
                ),
            )
        try:
            check.text(request.name, "name", max_chars=200, required=True)
            labels = check.string_map(
                request.labels,
                "labels",
                max_items=self.settings.max_labels,
                max_chars=self.settings.max_label_chars,
            )
            device = {
                "kind": check.text(request.device.kind, "device.kind", max_chars=200),
                "name": check.text(request.device.name, "device.name", max_chars=200),
                "total_memory_bytes": check.count(
                    request.device.total_memory_bytes, "device.total_memory_bytes"
                ),
            }
            check.count(request.device.free_memory_bytes, "device.free_memory_bytes")
            check.count(request.budget_bytes, "budget_bytes")
        except WireError as e:
            await self._reject(context, e)
        # Read before the worker exists: a task for it can only be created, and the epoch
        # bumped, after this, so its first polls at this epoch need no query.
        epoch = self.signals.task_epoch
        worker_id, token = await self._blocking(
            self.store.register_worker, request.name, labels, device, request.budget_bytes
        )
        self._remember_empty(worker_id, epoch)
        metrics.REGISTRATIONS.inc()
        metrics.WORKERS.set(metrics.WORKER_BUDGET, worker_id, request.budget_bytes)
        log.info("registered worker %s (%s)", request.name, worker_id)
        return coordinator_pb2.RegisterResponse(
            worker_id=worker_id,
            token=token,
            heartbeat_interval_ms=self.cadence.interval_ms,
            poll_keeps_alive=True,
        )

    async def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        worker = await self._worker(context, request.worker_id)
        try:
            check.ident(request.task_id, "task_id", required=False)
        except WireError as e:
            await self._reject(context, e, worker_id=worker.id)
        self.store.heartbeat(worker.id, _STATES.get(request.state, "idle"), request.task_id)
        abandon = False
        if request.task_id:
            task = await self._blocking(self.store.task_state, request.task_id)
            abandon = task is None or task.worker_id != worker.id or task.status != "offered"
        return coordinator_pb2.HeartbeatResponse(
            heartbeat_interval_ms=self.cadence.interval_ms,
            abandon_task=abandon,
            poll_keeps_alive=True,
        )

    async def ReportProfile(
        self, request: coordinator_pb2.ReportProfileRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.ReportProfileResponse:
        worker = await self._worker(context, request.worker_id)
        task = await self._own_task(context, worker, request.task_id)
        late = task.status == "straggler"  # kept: the next round need not profile again
        if (
            task.kind != "profile"
            or task.job_id != request.job_id
            or not (task.status == "offered" or late)
        ):
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_NOT_ASSIGNED,
                    "no open profile task for this job",
                    "task_id",
                ),
                job_id=request.job_id,
                worker_id=worker.id,
            )
        try:
            await self._blocking(self._store_profile, request.profile, task, worker.id)
        except WireError as e:
            await self._reject(
                context, e, job_id=task.job_id, round_number=task.round, worker_id=worker.id
            )
        self.signals.upload_accepted(task.job_id)  # counts towards the profiles awaited
        return coordinator_pb2.ReportProfileResponse()

    def _store_profile(
        self, profile: profile_pb2.MemoryProfile, task: TaskState, worker_id: str
    ) -> None:
        """Check a reported profile against the job and store it (blocking: it may read the
        job, its model's config and its global adapter, and it writes)."""
        row = self._checked_profile(profile, task.job_id)
        self.store.finish_profile_task(task.id, task.job_id, worker_id, row)

    def _checked_profile(self, profile: profile_pb2.MemoryProfile, job_id: str) -> dict[str, Any]:
        """The stored form of a reported profile that fits the job."""
        row = profile_row(profile, self._adapter_bounds(job_id))
        if self.store.has_version(job_id):
            # The global adapter exists: a profile of other shapes cannot train it.
            differs = first_difference(row["tensors"], self._shapes(job_id))
            if differs is not None:
                raise _error(
                    errors_pb2.ERROR_REASON_SHAPE_MISMATCH,
                    f"profile disagrees with the job's global adapter: {differs}",
                    "profile.tensors",
                )
        return row

    async def PollTask(
        self, request: coordinator_pb2.PollTaskRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.PollTaskResponse:
        worker = await self._worker(context, request.worker_id)
        self.store.poll_opened(worker.id)  # the open poll is its heartbeat
        try:
            reply = await self._poll(worker, request, context)
        finally:
            self.store.poll_closed(worker.id)
        reply.heartbeat_interval_ms = self.cadence.interval_ms
        return reply

    async def _poll(
        self,
        worker: Worker,
        request: coordinator_pb2.PollTaskRequest,
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.PollTaskResponse:
        deadline = time.monotonic() + min(request.wait_ms, self.settings.max_poll_wait_ms) / 1000
        # Set by new tasks and by the call's end (the client went away): a waiting poll is
        # a coroutine that one of those or its own timer wakes; it holds no thread.
        wake, ended = asyncio.Event(), asyncio.Event()

        def end(_: object) -> None:
            ended.set()
            wake.set()

        context.add_done_callback(end)
        epoch = self.signals.task_epoch
        while True:
            if not self._known_empty(worker.id, epoch):
                async with self._poll_queries:
                    message = await self._blocking(self._offered_message, worker.id)
                if message is not None:
                    self._empty_polls.pop(worker.id, None)
                    metrics.BYTES_OUT.inc(len(message.adapter_data))  # an adapter riding along
                    return coordinator_pb2.PollTaskResponse(task=message)
                self._remember_empty(worker.id, epoch)
            # Query again only when tasks were created since (one wake-up per round for
            # each waiting worker, not one per upload or per second).
            seen = epoch
            while epoch == seen:
                remaining = deadline - time.monotonic()
                wake.clear()  # before the check: an end from here on sets it again
                if remaining <= 0 or ended.is_set():
                    return coordinator_pb2.PollTaskResponse()
                epoch = await self.signals.tasks_after(seen, remaining, wake)
            # Woken with every other waiting poll: answer in a wave, not all at once.
            delay = wave_delay(self.signals.woken, self.settings.task_wave_per_s)
            delay = min(delay, deadline - time.monotonic())
            if delay > 0:
                wake.clear()  # from here on only the call's end sets it
                await wait_event(wake, delay)
            if ended.is_set():
                return coordinator_pb2.PollTaskResponse()

    def _offered_message(self, worker_id: str) -> coordinator_pb2.Task | None:
        task = self.store.offered_task(worker_id)
        return self._task_message(task) if task is not None else None

    def _known_empty(self, worker_id: str, epoch: int) -> bool:
        """Whether this worker's last poll found no task at the same task epoch, recently.

        The epoch is read before each query and bumped only after new tasks commit, so
        an unchanged epoch means no task was offered since: an idle worker polling
        again every few seconds costs no query. Past :data:`EMPTY_POLL_TRUST_S` it
        queries anyway, so a task written by anything but this process's driver is
        still found."""
        seen = self._empty_polls.get(worker_id)
        return (
            seen is not None
            and seen[0] == epoch
            and time.monotonic() - seen[1] < EMPTY_POLL_TRUST_S
        )

    def _remember_empty(self, worker_id: str, epoch: int) -> None:
        if len(self._empty_polls) >= MAX_REMEMBERED_POLLS:
            self._empty_polls.clear()  # only ever costs a query per worker
        self._empty_polls[worker_id] = (epoch, time.monotonic())

    def _task_message(self, task: TaskOffer) -> coordinator_pb2.Task:
        spec = self._spec(task.job_id)
        assert spec is not None
        deadline_ms = int(task.deadline_at.timestamp() * 1000) if task.deadline_at else 0
        inline = (
            self._inline_adapter(task.job_id, task.adapter_version)
            if task.kind == "train"
            else None
        )
        adapter, adapter_data = inline if inline is not None else (None, b"")
        return coordinator_pb2.Task(
            task_id=task.id,
            job_id=task.job_id,
            round=task.round,
            kind=_KINDS[task.kind],
            config=job_config(spec),
            modules=task.modules,
            adapter_version=task.adapter_version,
            predicted_peak_bytes=task.predicted_bytes,
            deadline_unix_ms=deadline_ms,
            adapter=adapter,
            adapter_data=adapter_data,
        )

    async def RefuseTask(
        self, request: coordinator_pb2.RefuseTaskRequest, context: grpc.aio.ServicerContext
    ) -> coordinator_pb2.RefuseTaskResponse:
        worker = await self._worker(context, request.worker_id)
        task = await self._own_task(context, worker, request.task_id)
        reason = _reason_name(request.reason.reason)
        message = request.reason.message[:2000].replace("\x00", "")
        if task.status == "offered":
            await self._blocking(self._refuse, task, worker.id, reason, message)
        return coordinator_pb2.RefuseTaskResponse()

    def _refuse(self, task: TaskState, worker_id: str, reason: str, message: str) -> None:
        self.store.set_task_status(task.id, "refused", f"{reason}: {message}")
        self.store.record_rejection(
            f"refused:{reason}",
            message,
            job_id=task.job_id,
            round_number=task.round,
            worker_id=worker_id,
        )

    async def DownloadAdapter(
        self, request: coordinator_pb2.DownloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.AdapterChunk]:
        worker = await self._worker(context, request.worker_id)
        found = await self._blocking(self._version_to_send, request.job_id, request.version)
        if found is None:
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_UNKNOWN_ADAPTER_VERSION,
                    f"job {request.job_id!r} has no adapter version {request.version}",
                    "version",
                ),
                job_id=request.job_id,
                worker_id=worker.id,
            )
        manifest, blob = found
        with blob:
            yield transfer_pb2.AdapterChunk(manifest=manifest)
            sent = 0
            while sent < manifest.payload.total_bytes:
                # The first chunk was read with the version; the rest off the loop.
                chunk = blob.first or await self._blocking(blob.file.read, MAX_CHUNK_BYTES)
                blob.first = b""
                if not chunk:
                    raise RuntimeError(f"blob {manifest.payload.sha256} ended after {sent} bytes")
                yield transfer_pb2.AdapterChunk(data=chunk)
                sent += len(chunk)
                metrics.BYTES_OUT.inc(len(chunk))

    def _version_to_send(
        self, job_id: str, number: int
    ) -> tuple[transfer_pb2.AdapterManifest, _OpenBlob] | None:
        """A stored version's manifest and its blob opened with the first chunk read (a
        small adapter's download needs nothing else), or None."""
        found = self._adapter_manifest(job_id, number)
        if found is None:
            return None
        manifest, sha256 = found
        file = self.blobs.path(sha256).open("rb")
        return manifest, _OpenBlob(file, file.read(MAX_CHUNK_BYTES))

    def _adapter_manifest(
        self, job_id: str, number: int
    ) -> tuple[transfer_pb2.AdapterManifest, str] | None:
        """What describes a stored version to a worker, and its blob's address; None if the
        job has no such version. A version never changes: described once, not per task or
        download."""
        known = self._manifests.get((job_id, number))
        if known is not None:
            return known
        version = self.store.version(job_id, number)
        spec = self._spec(job_id) if version is not None else None
        if version is None or spec is None:
            return None
        with self.blobs.mapped(version.sha256) as data:
            payload = _manifest_of(data, version.sha256)
        manifest = transfer_pb2.AdapterManifest(
            job_id=version.job_id,
            version=version.version,
            payload=payload,
            lora_rank=spec.lora.rank,
            lora_alpha=spec.lora.alpha,
            target_modules=spec.lora.target_modules,
        )
        if len(self._manifests) >= 64:
            self._manifests.clear()
        self._manifests[(job_id, number)] = (manifest, version.sha256)
        return manifest, version.sha256

    def _inline_adapter(
        self, job_id: str, number: int
    ) -> tuple[transfer_pb2.AdapterManifest, bytes] | None:
        """A version small enough to ride along with its training tasks, with its bytes
        (kept for the next tasks of the round: each is read once), or None."""
        found = self._adapter_manifest(job_id, number)
        if found is None or found[0].payload.total_bytes > INLINE_ADAPTER_BYTES:
            return None
        manifest, sha256 = found
        data = self._inline.get(sha256)
        if data is None:
            data = self.blobs.read(sha256)
            if len(self._inline) >= 8:
                self._inline.clear()
            self._inline[sha256] = data
        return manifest, data

    async def UploadUpdate(
        self,
        request_iterator: AsyncIterator[transfer_pb2.UploadUpdateRequest],
        context: grpc.aio.ServicerContext,
    ) -> coordinator_pb2.UploadUpdateResponse:
        # Who is calling is known from the metadata before any message is read.
        token = bearer_token(context)
        caller = self.store.known_token(token) or await self._blocking(
            self.store.worker_by_token, token
        )
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "manifest":
            await self._reject(
                context,
                _error(
                    errors_pb2.ERROR_REASON_MALFORMED,
                    "an upload must start with its manifest",
                    "manifest",
                ),
                worker_id=caller.id if caller else None,
            )
        m = first.manifest
        worker = await self._worker(context, m.worker_id)
        where = {"job_id": m.job_id or None, "round_number": m.round, "worker_id": worker.id}
        try:
            _check_update_fields(m, self.settings.max_profile_modules)
            task = await self._blocking(self._upload_target, worker, m)
            if task.update_id is not None:
                # Idempotent, even after the round closed: a retried upload counts once.
                async for _ in request_iterator:
                    pass
                metrics.DUPLICATE_UPLOADS.inc()
                return coordinator_pb2.UploadUpdateResponse(
                    update_id=str(task.update_id), duplicate=True
                )
            receiver = PayloadReceiver(
                m.payload,
                max_total_bytes=self.settings.max_upload_bytes,
                keep=False,
                hashing=False,  # the blob store hashes what it writes
            )
            # Chunks go straight to a staged file while they are checked (hashed and
            # written on the writer's thread); the file is verified through a memory map
            # and becomes visible only if all checks pass. It is created with the first
            # chunk: a stream stalled after its manifest holds no file.
            writer: BlobWriter | None = None
            try:
                async for msg in request_iterator:
                    if msg.WhichOneof("kind") != "data":
                        raise _error(
                            errors_pb2.ERROR_REASON_MALFORMED,
                            "a second manifest inside an upload",
                            "manifest",
                        )
                    receiver.feed(msg.data)
                    writer = writer or self.blobs.writer()
                    if not writer.put_nowait(msg.data):  # its window is full: wait off the loop
                        await self._blocking(writer.put, msg.data)
            except BaseException:
                if writer is not None:
                    await self._blocking(writer.abandon)
                raise
            writer = writer or self.blobs.writer()  # no data: the checks below say why
            record, size = await self._blocking(
                self._store_update, writer, receiver, task, worker, m
            )
        except WireError as e:
            await self._reject(context, e, **where)
        if record.duplicate:
            metrics.DUPLICATE_UPLOADS.inc()
        else:
            metrics.UPLOADS.inc()
            metrics.BYTES_IN.inc(size)
            metrics.WORKERS.set(metrics.WORKER_PEAK, worker.id, m.measured_peak_bytes)
            metrics.WORKERS.set(metrics.WORKER_PREDICTED, worker.id, m.predicted_peak_bytes)
            self.signals.upload_accepted(task.job_id)
        return coordinator_pb2.UploadUpdateResponse(
            update_id=str(record.update_id), duplicate=record.duplicate
        )

    def _store_update(
        self,
        writer: BlobWriter,
        receiver: PayloadReceiver,
        task: UploadTarget,
        worker: Worker,
        m: transfer_pb2.UpdateManifest,
    ) -> tuple[UpdateRecord, int]:
        """Verify the received bytes, then commit the row and the blob together (blocking:
        hashing, a memory-mapped scan, an fsync, a transaction)."""
        staged = writer.finish()
        try:
            with staged.mapped() as payload:
                # size, sha256, names, shapes, dtypes, finite (while the fsync runs)
                receiver.finish_with(payload, sha256=staged.sha256)
            # The row first, the blob made visible inside its transaction: a row the
            # database refuses leaves no blob behind.
            record = self.store.record_update(
                Update(
                    job_id=task.job_id,
                    round=task.round,
                    worker_id=worker.id,
                    task_id=task.id,
                    sha256=staged.sha256,
                    byte_count=staged.size,
                    num_samples=m.num_samples,
                    loss_before=m.train_loss_before,
                    loss_after=m.train_loss_after,
                    local_scores=dict(m.local_scores),
                    predicted_bytes=m.predicted_peak_bytes,
                    measured_peak_bytes=m.measured_peak_bytes,
                    train_seconds=m.train_seconds,
                ),
                before_commit=staged.commit,
            )
        except TaskClosed as e:
            raise _error(
                errors_pb2.ERROR_REASON_ROUND_CLOSED, f"{e}: the round closed", "task_id"
            ) from e
        finally:
            if not staged.committed:
                staged.discard()
        return record, staged.size

    def _upload_target(self, worker: Worker, m: transfer_pb2.UpdateManifest) -> UploadTarget:
        """The task an upload is for, checked to take this manifest now (blocking: one
        query, and the global adapter's shapes once per job). A task that already has its
        update is returned unchecked: the upload is a retry."""
        task = self._upload_task(worker, m)
        if task.update_id is None:
            self._require_open_round(task)
            self._check_manifest(task, m)
        return task

    def _upload_task(self, worker: Worker, m: transfer_pb2.UpdateManifest) -> UploadTarget:
        task = self.store.upload_target(m.task_id)
        if task is None or task.worker_id != worker.id or task.kind != "train":
            raise _error(
                errors_pb2.ERROR_REASON_NOT_ASSIGNED,
                f"task {m.task_id!r} is not a training task of this worker",
                "task_id",
            )
        if task.job_id != m.job_id or task.round != m.round:
            raise _error(
                errors_pb2.ERROR_REASON_WRONG_ROUND,
                f"task {task.id} belongs to job {task.job_id} round {task.round}, "
                f"not job {m.job_id} round {m.round}",
                "round",
            )
        if m.num_samples <= 0:
            raise _error(
                errors_pb2.ERROR_REASON_MALFORMED, "num_samples must be > 0", "num_samples"
            )
        return task

    def _require_open_round(self, task: UploadTarget) -> None:
        if task.round_closed_at is not None or task.round_state != "training":
            raise _error(
                errors_pb2.ERROR_REASON_ROUND_CLOSED,
                f"round {task.round} of job {task.job_id} no longer takes uploads",
                "round",
            )
        if task.status != "offered":
            raise _error(
                errors_pb2.ERROR_REASON_ROUND_CLOSED, f"task {task.id} is {task.status}", "task_id"
            )

    def _check_manifest(self, task: UploadTarget, m: transfer_pb2.UpdateManifest) -> None:
        """The declared tensors are exactly the assigned modules' tensors, shaped as globally."""
        shapes = self._shapes(task.job_id)
        assigned = set(task.modules)
        expected = {k: v for k, v in shapes.items() if k.rpartition(SEPARATOR)[0] in assigned}
        declared = {t.name: t for t in m.payload.tensors}
        for name in declared:
            module = name.rpartition(SEPARATOR)[0]
            if name not in shapes:
                raise _error(
                    errors_pb2.ERROR_REASON_UNKNOWN_TENSOR,
                    f"{name!r} is not a tensor of the global adapter",
                    name,
                )
            if module not in assigned:
                raise _error(
                    errors_pb2.ERROR_REASON_MODULE_NOT_ASSIGNED,
                    f"module {module!r} was not assigned to this worker",
                    name,
                )
        missing = sorted(set(expected) - set(declared))
        if missing:
            raise _error(
                errors_pb2.ERROR_REASON_UNKNOWN_TENSOR,
                f"assigned tensors missing from the upload: {missing[:5]}",
                "manifest.tensors",
            )
        job_spec = self._spec(task.job_id)
        wanted = wire_dtype(job_spec.payload_dtype if job_spec else "float32")
        for name, spec in declared.items():
            if list(spec.shape) != list(expected[name]):
                raise _error(
                    errors_pb2.ERROR_REASON_SHAPE_MISMATCH,
                    f"{name!r} has shape {list(spec.shape)}, the global adapter "
                    f"{list(expected[name])}",
                    name,
                )
            if spec.dtype != wanted:
                raise _error(
                    errors_pb2.ERROR_REASON_DTYPE_MISMATCH,
                    f"{name!r} must be {dtype_name(wanted)} (the job's payload_dtype), "
                    f"got {dtype_name(spec.dtype)}",
                    name,
                )


@dataclass
class _OpenBlob:
    """A blob being sent: its file, and the first chunk already read from it."""

    file: BinaryIO
    first: bytes

    def __enter__(self) -> _OpenBlob:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()


def _reason_name(value: int) -> str:
    """The enum name of a reason, or its number when a sender made one up."""
    try:
        return str(errors_pb2.ErrorReason.Name(value))
    except ValueError:
        return f"ERROR_REASON_{int(value)}"


def _check_update_fields(m: transfer_pb2.UpdateManifest, max_modules: int) -> None:
    """Every number and string of an update's manifest, before anything is stored."""
    check.count(m.num_samples, "num_samples", maximum=check.MAX_SAMPLES, minimum=1)
    check.count(m.predicted_peak_bytes, "predicted_peak_bytes")
    check.count(m.measured_peak_bytes, "measured_peak_bytes")
    check.finite(m.train_loss_before, "train_loss_before", low=0.0, high=check.MAX_LOSS)
    check.finite(m.train_loss_after, "train_loss_after", low=0.0, high=check.MAX_LOSS)
    check.finite(m.train_seconds, "train_seconds", low=0.0, high=check.MAX_SECONDS)
    check.score_map(m.local_scores, "local_scores", max_items=max_modules)
    if len(m.payload.tensors) > max_modules * 4:
        raise check.malformed(
            f"manifest lists {len(m.payload.tensors)} tensors", "manifest.payload.tensors"
        )


def _manifest_of(data: Buffer, sha256: str) -> transfer_pb2.PayloadManifest:
    """A stored version's manifest with both digests: workers check the BLAKE3 one (a
    fraction of sha256's time), workers that predate it the sha256 it is stored under."""
    tensors = decode_tensors(data)
    specs = tensor_specs(tensors)
    del tensors  # views into ``data``, which the caller is about to unmap
    blake3 = new_hasher("blake3")
    blake3.update(data)
    return transfer_pb2.PayloadManifest(
        tensors=specs, total_bytes=len(data), sha256=sha256, blake3=blake3.hexdigest()
    )
