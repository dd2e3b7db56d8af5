"""The worker process: register, heartbeat, take tasks, profile, train, upload.

Network failures are expected: every call to the coordinator is retried with
exponential backoff and jitter while the coordinator is unreachable, and a
worker whose identity the coordinator no longer knows registers again. SIGTERM
stops the loop after the current call; an unfinished task is simply not
uploaded (the coordinator treats the worker as a straggler).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fedpilot.core.aggregation import flatten, unflatten
from fedpilot.tls import channel_credentials
from fedpilot.v1 import coordinator_pb2, errors_pb2, profile_pb2, transfer_pb2
from fedpilot.wire import WireError, error_detail_from_rpc_error
from fedpilot.wire.payload import WIRE_DTYPES, tensor_specs
from fedpilot.wire.serde import memory_to_proto
from fedpilot.worker import metrics
from fedpilot.worker.budget import MemoryGuard, is_out_of_memory, warm_up
from fedpilot.worker.client import CoordinatorClient, task_of

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRYABLE = {
    # A call this worker did not cancel itself: gRPC cancels calls a loaded server has
    # not taken up in time (measured at 2,000 workers), and a stream the coordinator
    # found idle. Retrying, not exiting, is what keeps the worker in the fleet.
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
}


def parse_bytes(text: str) -> int:
    """``6GiB``, ``512MiB``, ``2GB`` or a plain byte count."""
    units = {
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
    }
    t = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def resolve_budget(device: str, explicit: int | None, safety_margin: int) -> int:
    """CUDA: free memory minus the margin, lowered by an explicit budget; CPU: explicit only."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        budget = max(0, int(free) - safety_margin)
        return min(budget, explicit) if explicit is not None else budget
    if explicit is None:
        raise ValueError("on CPU a memory budget is required (--memory-budget, e.g. 2GiB)")
    return explicit


@dataclass
class WorkerSettings:
    coordinator: str
    name: str
    data: Path
    memory_budget: int | None = None
    safety_margin: int = 512 * 2**20
    device: str = "cpu"
    labels: dict[str, str] = field(default_factory=dict)
    enrollment_secret: str = ""
    poll_wait_ms: int = 20_000
    """One long poll's wait (the coordinator holds it at most ``max_poll_wait_ms``, 20 s
    by default). A task ends the wait at once, so a long wait delays nothing; it only
    spares the coordinator polls: 100 a second at 2,000 idle workers instead of 400
    at 5 s. :meth:`WorkerService.shutdown` cuts a waiting poll short."""
    max_backoff_s: float = 30.0
    probe_examples: int = 16
    loss_batches: int = 4
    partition: tuple[int, int] | None = None
    """(index, count): train on one part of a shared ``data`` file (experiments)."""
    partition_alpha: float | None = None
    """Dirichlet label skew of the partition; None = IID."""
    partition_seed: int = 0
    text_column: str | None = None
    """Column (CSV, datasets) or key (JSON Lines) of the text; None = ``text``, ``sentence``..."""
    label_column: str | None = None
    """Column or key of the label; None = ``label``, ``category``, ``intent`` or ``class``."""
    skip_unknown_labels: bool = True
    """Leave out examples whose label is not among the job's classes (counted in the log);
    False refuses the job's tasks instead."""
    threads: int = 0
    """torch intra-op threads; 0 = torch's default. Several workers on one machine
    must share its cores, or OpenMP threads spin against each other."""
    tls_ca: Path | None = None
    """Trust this CA for the coordinator's certificate (turns TLS on)."""
    tls_cert: Path | None = None
    """This worker's certificate, for coordinators that require mutual TLS."""
    tls_key: Path | None = None
    memory_cgroup: bool = False
    """CPU, as root or with a delegated cgroup: move into a memory cgroup of its own limited
    to the idle baseline + budget (``fedpilot worker`` turns it on; see ``budget``)."""


class WorkerService:
    def __init__(self, settings: WorkerSettings, client: CoordinatorClient | None = None) -> None:
        self.settings = settings
        self.budget = resolve_budget(
            settings.device, settings.memory_budget, settings.safety_margin
        )
        if client is None:
            credentials = None
            if settings.tls_ca is not None:
                credentials = channel_credentials(
                    settings.tls_ca, settings.tls_cert, settings.tls_key
                )
            elif settings.tls_cert is not None:
                raise ValueError("--tls-cert needs --tls-ca (the CA of the coordinator)")
            client = CoordinatorClient(settings.coordinator, credentials=credentials)
        self.client = client
        metrics.BUDGET.set(self.budget)
        self.guard = MemoryGuard.start(settings.device, self.budget, cgroup=settings.memory_cgroup)
        self._loaded: tuple[int, ...] = ()
        log.info(
            "memory budget %d bytes enforced by %s: %s",
            self.budget,
            self.guard.kind,
            self.guard.detail,
        )
        self.stop = threading.Event()
        self._poll: grpc.Future | None = None
        """The long poll in progress, for :meth:`shutdown`."""
        self.state = coordinator_pb2.WORKER_STATE_IDLE
        self.task_id = ""
        self.abandon = threading.Event()
        self._models: dict[str, Any] = {}
        self._data: dict[Any, Any] = {}
        self._examples: Any = None
        self._datasets: dict[Any, Any] = {}
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)

    # -- resilience ------------------------------------------------------------------------

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying while the coordinator is unreachable; re-register if forgotten."""
        delay = 0.5
        while True:
            try:
                result = fn()
                metrics.CONNECTED.set(1)
                return result
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                if code in _RETRYABLE:
                    metrics.CONNECTED.set(0)
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    log.warning("coordinator does not know this worker: registering again")
                    self.register()
                    continue
                if code not in _RETRYABLE or self.stop.is_set():
                    raise
                log.info("coordinator unreachable (%s); retrying in %.1fs", code.name, delay)
                if self.stop.wait(delay * random.uniform(0.5, 1.0)):
                    raise
                delay = min(delay * 2, self.settings.max_backoff_s)

    def register(self) -> None:
        device = coordinator_pb2.DeviceInfo(
            kind="cuda" if "cuda" in self.settings.device else "cpu", name=self.settings.device
        )
        delay = 0.5
        while True:
            try:
                reg = self.client.register(
                    self.settings.name,
                    labels=self.settings.labels,
                    device=device,
                    budget_bytes=self.budget,
                    enrollment_secret=self.settings.enrollment_secret,
                )
                log.info("registered as %s with budget %d bytes", reg.worker_id, self.budget)
                return
            except grpc.RpcError as e:
                if e.code() not in _RETRYABLE or self.stop.is_set():  # type: ignore[attr-defined]
                    raise
                if self.stop.wait(delay):
                    raise
                delay = min(delay * 2, self.settings.max_backoff_s)

    def shutdown(self) -> None:
        """Stop after the task in hand (a transfer runs to its end), and cut a waiting
        long poll short rather than let it run out its wait (up to ``poll_wait_ms``)."""
        self.stop.set()
        poll = self._poll
        if poll is not None:
            poll.cancel()

    def _poll_task(self) -> coordinator_pb2.Task | None:
        """One long poll that :meth:`shutdown` can cancel; None when it ended empty."""
        future = self.client.poll_task_future(self.settings.poll_wait_ms)
        self._poll = future
        try:
            if self.stop.is_set():
                future.cancel()
            return task_of(future.result())
        except grpc.FutureCancelledError:
            return None
        finally:
            self._poll = None

    @property
    def heartbeat_s(self) -> float:
        """The interval the coordinator last told (its cadence follows its fleet)."""
        return self.client.heartbeat_interval_ms / 1000 or 2.0

    def _heartbeats(self) -> None:
        while not self.stop.wait(self.heartbeat_s):
            if not self.client.heartbeat_needed:  # an open long poll keeps it alive
                continue
            try:
                reply = self.client.heartbeat(self.state, self.task_id)
                if reply.abandon_task and self.task_id:
                    self.abandon.set()
            except grpc.RpcError as e:
                log.debug("heartbeat failed: %s", e.code())  # type: ignore[attr-defined]

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        self.register()
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        while not self.stop.is_set():
            try:
                task = self.call(self._poll_task)
            except grpc.RpcError:
                if self.stop.is_set():
                    break
                raise
            if task is None:
                continue
            self.task_id, self.abandon = task.task_id, threading.Event()
            kind = "profile" if task.kind == coordinator_pb2.TASK_KIND_PROFILE else "train"
            outcome = "done"
            try:
                if task.kind == coordinator_pb2.TASK_KIND_PROFILE:
                    self._profile(task)
                elif task.kind == coordinator_pb2.TASK_KIND_TRAIN:
                    self._train(task)
            except WireError as e:
                outcome = "refused"
                log.warning("refusing task %s: %s", task.task_id, e.message)
                self.call(lambda t=task.task_id, e=e: self.client.refuse_task(t, e))
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                outcome = "out_of_memory"
                error = self._out_of_memory(task, e)
                log.error("task %s ran out of memory: %s", task.task_id, error.message)
                self.call(lambda t=task.task_id, e=error: self.client.refuse_task(t, e))
            except grpc.RpcError as e:
                outcome = "rejected"
                # The coordinator refused a call of this task (e.g. a profile reported after
                # its round had moved on): that ends the task, not the worker.
                if self.stop.is_set():
                    break
                detail = error_detail_from_rpc_error(e)
                log.warning(
                    "task %s refused by the coordinator: %s",
                    task.task_id,
                    detail.message if detail else e.code(),  # type: ignore[attr-defined]
                )
            finally:
                metrics.TASKS.labels(kind=kind, outcome=outcome).inc()
                self.task_id, self.state = "", coordinator_pb2.WORKER_STATE_IDLE
                self.guard.task_done()
        self.client.close()
        self.guard.close()
        log.info("worker stopped")

    # -- memory ----------------------------------------------------------------------------

    def _job_loaded(self, model: Any, *state: Any) -> None:
        """Tell the guard the job is loaded (re-measuring its baseline when anything was
        reloaded) just before a task's work starts."""
        from fedpilot.worker.profiling import weight_bytes

        loaded = tuple(id(x) for x in (model, *state))
        reloaded = loaded != self._loaded
        self._loaded = loaded
        if reloaded and state:
            warm_up(model, state[0])
        self.guard.job_loaded(weight_bytes(model), reloaded=reloaded)
        metrics.MEMORY_BASELINE.set(self.guard.baseline_bytes)
        metrics.MEMORY_LIMIT.set(self.guard.limit_bytes)

    def _out_of_memory(self, task: coordinator_pb2.Task, e: BaseException) -> WireError:
        """The task's failure with the numbers; what the task held is released first."""
        import gc

        gc.collect()
        if "cuda" in self.settings.device:
            import torch

            torch.cuda.empty_cache()
        peak = self.guard.peak_bytes()
        return WireError(
            errors_pb2.ERROR_REASON_OUT_OF_MEMORY,
            f"out of memory in the task: budget {self.budget} bytes, predicted "
            f"{task.predicted_peak_bytes}, measured peak {peak} ({type(e).__name__}: "
            f"{str(e)[:200]})",
            "memory",
            {
                "budget_bytes": str(self.budget),
                "predicted_bytes": str(task.predicted_peak_bytes),
                "measured_peak_bytes": str(peak),
                "enforcement": self.guard.kind,
            },
        )

    # -- tasks -----------------------------------------------------------------------------

    def _model(self, config: coordinator_pb2.JobConfig) -> Any:
        from fedpilot.worker.model import ModelSpec, load_model

        spec = ModelSpec(
            model_path=config.model or None,
            num_labels=config.num_labels,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=tuple(config.target_modules),
            dtype=config.dtype or "float32",
            max_seq_len=config.max_seq_len,
            batch_size=config.batch_size,
            task=config.task or "sequence-classification",
        )
        key = repr(spec)
        if key not in self._models:
            # Free the previous job's model first: both at once may not fit the memory limit.
            self._models = {}
            try:
                self._models = {
                    key: (spec, load_model(spec, device=self.settings.device, seed=config.seed))
                }
            except (OSError, ValueError) as e:
                raise WireError(
                    errors_pb2.ERROR_REASON_MODEL_UNAVAILABLE,
                    f"cannot load model {config.model or 'default'}: {e}",
                    "config.model",
                ) from e
        return self._models[key]

    def check_data(self) -> int:
        """Read the data once, so that a missing file, an unknown format, a missing
        column, a bad line or an empty file stops the worker before it registers.
        The format decides the task it serves (labelled texts, instruction JSON Lines,
        images); labels are checked against each job's classes when its first task arrives."""
        from fedpilot.worker.tasks import read_local_data

        if self._examples is None:
            self._examples = read_local_data(
                self.settings.data,
                text_column=self.settings.text_column,
                label_column=self.settings.label_column,
            )
        return len(self._examples)

    def _dataset(self, config: coordinator_pb2.JobConfig) -> Any:
        """This worker's examples with the job's class ids (and its partition, if any).

        Bad data is refused as MALFORMED with the reason, before any profiling or training."""
        from fedpilot.worker.data import partition
        from fedpilot.worker.tasks import get_task

        key = (config.task, tuple(config.label_names), config.num_labels)
        if key not in self._datasets:
            try:
                self.check_data()
                data = get_task(config.task or "sequence-classification").dataset(
                    self._examples,
                    label_names=list(config.label_names) or None,
                    num_labels=config.num_labels,
                    skip_unknown_labels=self.settings.skip_unknown_labels,
                )
                if self.settings.partition is not None:
                    index, count = self.settings.partition
                    data = partition(
                        data,
                        index,
                        count,
                        alpha=self.settings.partition_alpha,
                        seed=self.settings.partition_seed,
                    )
            except ValueError as e:
                log.error("cannot train on %s: %s", self.settings.data, e)
                raise WireError(errors_pb2.ERROR_REASON_MALFORMED, str(e), "data") from e
            self._datasets = {key: data}
        return self._datasets[key]

    def _batches(self, config: coordinator_pb2.JobConfig, spec: Any) -> list[Any]:
        from fedpilot.worker.tasks import get_task

        key = (
            spec.task,
            spec.path,
            config.batch_size,
            config.max_seq_len,
            tuple(config.label_names),
            config.num_labels,
        )
        if key not in self._data:
            try:
                batches = get_task(spec.task).batches(self._dataset(config), spec)
            except ValueError as e:
                raise WireError(errors_pb2.ERROR_REASON_MALFORMED, str(e), "data") from e
            self._data = {key: batches}
        return self._data[key]

    def _profile(self, task: coordinator_pb2.Task) -> None:
        from fedpilot.worker.model import get_module_state
        from fedpilot.worker.profiling import dummy_batch, profile_memory

        self.state = coordinator_pb2.WORKER_STATE_PROFILING
        self._dataset(task.config)  # a worker that cannot train on its data does not profile
        spec, model = self._model(task.config)
        self._job_loaded(model)
        memory = profile_memory(model, dummy_batch(model, spec.batch_size, spec.max_seq_len))
        shapes = tensor_specs(flatten(get_module_state(model)))
        method = (
            profile_pb2.PROFILE_METHOD_CUDA_PEAK
            if "cuda" in self.settings.device
            else profile_pb2.PROFILE_METHOD_SAVED_TENSORS
        )
        message = memory_to_proto(
            memory, self.budget, method=method, device=self.settings.device, tensors=shapes
        )
        self.call(lambda: self.client.report_profile(task.job_id, task.task_id, message))
        log.info(
            "profiled job %s: M0=%d bytes, full cost %d bytes, budget %d",
            task.job_id,
            memory.base_bytes,
            memory.full_cost(),
            self.budget,
        )

    def _train(self, task: coordinator_pb2.Task) -> None:
        from fedpilot.worker.model import get_module_state, load_module_state
        from fedpilot.worker.scoring import local_ig_scores
        from fedpilot.worker.training import train

        self._dataset(task.config)
        if task.predicted_peak_bytes > self.budget:
            raise WireError(
                errors_pb2.ERROR_REASON_BUDGET_EXCEEDED,
                f"assignment needs {task.predicted_peak_bytes} bytes, budget is {self.budget}",
                "predicted_peak_bytes",
            )
        self.state = coordinator_pb2.WORKER_STATE_TRAINING
        config = task.config
        spec, model = self._model(config)
        _, tensors = self.call(lambda: self.client.adapter_for(task))
        metrics.DOWNLOAD_BYTES.inc(sum(t.nbytes for t in tensors.values()))
        load_module_state(model, unflatten(tensors))
        batches = self._batches(config, spec)
        self._job_loaded(model, batches)
        _fault_hold_training(self.stop)
        scores: Mapping[str, float] = {}
        if config.ig_probe_batches:
            scores = local_ig_scores(
                model, batches[: config.ig_probe_batches], max_examples=self.settings.probe_examples
            )
        result = train(
            model,
            list(task.modules),
            batches,
            steps=config.local_steps if not config.local_epochs else None,
            epochs=max(1, config.local_epochs),
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            seed=int(config.seed) + int(task.round),
        )
        metrics.TRAIN_STEPS.inc(result.steps)
        metrics.TRAIN_SAMPLES.inc(result.num_samples)
        metrics.TRAIN_SECONDS.inc(result.seconds)
        metrics.SAMPLES_PER_SECOND.set(result.num_samples / max(result.seconds, 1e-9))
        metrics.PREDICTED_PEAK.set(task.predicted_peak_bytes)
        metrics.MEASURED_PEAK.set(self.guard.peak_bytes() or result.peak_bytes)
        metrics.LOSS.set(result.loss_after)
        if self.abandon.is_set() or self.stop.is_set():
            log.info("task %s abandoned; not uploading", task.task_id)
            return
        if result.peak_bytes > self.budget:
            log.warning(
                "measured peak %d exceeded the budget %d (predicted %d)",
                result.peak_bytes,
                self.budget,
                task.predicted_peak_bytes,
            )
        self.state = coordinator_pb2.WORKER_STATE_UPLOADING
        manifest = transfer_pb2.UpdateManifest(
            job_id=task.job_id,
            round=task.round,
            task_id=task.task_id,
            base_version=task.adapter_version,
            num_samples=result.num_samples,
            train_loss_before=result.loss_before,
            train_loss_after=result.loss_after,
            local_scores=dict(scores),
            predicted_peak_bytes=task.predicted_peak_bytes,
            measured_peak_bytes=self.guard.peak_bytes() or result.peak_bytes,
            train_seconds=result.seconds,
        )
        dtype = WIRE_DTYPES.get(config.payload_dtype or "float32")
        if dtype is None:
            raise WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                f"unknown payload dtype {config.payload_dtype!r}",
                "config.payload_dtype",
            )
        update = {
            k: v.astype(dtype, copy=False)
            for k, v in flatten(get_module_state(model, list(task.modules))).items()
        }
        try:
            reply = self.call(lambda: self.client.upload_update(manifest, update))
            metrics.UPLOAD_BYTES.inc(sum(t.nbytes for t in update.values()))
        except grpc.RpcError as e:
            detail = error_detail_from_rpc_error(e)
            log.warning("upload refused: %s", detail.message if detail else e)
            return
        log.info(
            "round %d: trained %d modules, loss %.4f -> %.4f, uploaded%s",
            task.round,
            len(task.modules),
            result.loss_before,
            result.loss_after,
            " (duplicate)" if reply.duplicate else "",
        )


def _fault_hold_training(stop: threading.Event) -> None:
    """Test-only fault injection, off by default: with ``FEDPILOT_FAULT_TRAIN_DELAY_S`` set,
    hold each training task that long (in the TRAINING state) before training, so a test
    can kill the worker mid-training deterministically."""
    delay = float(os.environ.get("FEDPILOT_FAULT_TRAIN_DELAY_S") or 0)
    if delay > 0:
        log.warning("fault injection: holding the training task for %.1fs", delay)
        stop.wait(delay)
