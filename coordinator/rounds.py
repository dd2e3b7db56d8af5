"""The round state machine of every job, advanced by one driver thread.

    waiting -> profiling -> training -> aggregating -> evaluating -> (next round | done)
                      \\-> failed / cancelled

Every transition is persisted before the work it starts, and every piece of
work is idempotent, so a coordinator killed at any point resumes from the
stored state: a round in ``aggregating`` is aggregated again from the stored
updates (the version commit refuses a second copy), a round in ``training``
keeps waiting for the uploads it has not received.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from fedpilot.coordinator import metrics
from fedpilot.coordinator.adapter_shapes import agreed_shapes
from fedpilot.coordinator.cadence import HeartbeatCadence
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.db.models import Job, Profile, Task, Worker
from fedpilot.coordinator.db.store import TRANSIENT_ERRORS, Store, utcnow
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.coordinator.signals import Signals
from fedpilot.core.aggregation import (
    Aggregator,
    ClientUpdate,
    Packed,
    UpdateError,
    flatten,
    unflatten,
)
from fedpilot.core.initial import initial_adapter
from fedpilot.core.memory import WorkerProfile, memory_from_json
from fedpilot.core.round_plan import (
    Participant,
    fixed_order,
    latest_scores,
    plan_assignments,
    sample_participants,
)
from fedpilot.wire.payload import EncodedPayload, decode_packed, decode_tensors

log = logging.getLogger(__name__)

ACTIVE = ("waiting", "profiling", "training", "aggregating", "evaluating")

Evaluator = Callable[[JobSpec, Mapping[str, Mapping[str, np.ndarray]]], dict[str, float]]
"""Scores a global adapter on the job's held-out set: ``{"eval_loss", "eval_accuracy"}``."""


IMMEDIATE_STEPS = 8
"""Ticks in a row without waiting while jobs keep changing state (one round's
transitions take four or five)."""


class RoundDriver:
    """Advances every active job one step per :meth:`tick`."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        settings: CoordinatorSettings,
        signals: Signals,
        cadence: HeartbeatCadence,
        evaluator: Evaluator | None = None,
    ) -> None:
        """``cadence``: shared with the gRPC handlers; each tick sets it from the alive count."""
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.signals = signals
        self.cadence = cadence
        self.evaluator = evaluator
        self._assign_seconds: dict[tuple[str, int], float] = {}
        """Solve time of each open round's assignment, reported with its metrics."""
        self.last_loop = time.monotonic()
        """When the last loop of :meth:`run` ended (health checks read it)."""
        self.errors = 0
        """Loops that failed and were carried on."""
        self.awaited: dict[str, int] = {}
        """Uploads each training job (profile reports each profiling job) still awaited
        at the last tick: the driver wakes early only for the one that can end the phase
        (:mod:`coordinator.signals`)."""
        self.started_at = utcnow()
        """Heartbeats sent while this coordinator was down were never received; see
        :meth:`_any_holder_alive`."""

    def run(self, stop: threading.Event) -> None:
        """Tick until stopped. A failing tick is logged and counted, never fatal: one bad
        row must not stop every job (health checks see the failures and stalls)."""
        streak = 0
        while not stop.is_set():
            moved = False
            # Taken before the tick reads any task row: an upload accepted during the
            # tick then counts towards the wake-up, at worst one tick too early.
            mark = self.signals.upload_mark()
            try:
                moved = self.tick()
            except Exception:
                self.errors += 1
                metrics.DRIVER_ERRORS.inc()
                log.exception("round driver: tick failed; carrying on")
            self.last_loop = time.monotonic()
            metrics.DRIVER_LAST_LOOP.set_to_current_time()
            # A job that changed state takes its next step at once (a committed version
            # is evaluated, and the next round assigned, without a tick's wait each),
            # a bounded number of times in a row so a job that keeps changing cannot spin.
            streak = streak + 1 if moved else 0
            if moved and streak < IMMEDIATE_STEPS:
                continue
            streak = 0
            # Woken early by the upload that completes a round, so its aggregation
            # starts at once instead of at the next tick.
            self.signals.wait_for_uploads(mark, self.awaited, self.settings.tick_seconds)

    def tick(self) -> bool:
        """One step for every active job; whether any job changed state or round."""
        alive = self.store.alive_count(self.cadence.timeout_s)
        metrics.ALIVE_WORKERS.set(alive)
        cadence = self.cadence.observe(alive)
        metrics.HEARTBEAT_INTERVAL.set(cadence.interval_s)
        moved = False
        jobs = self.store.jobs(ACTIVE)
        self.awaited = {}
        self.signals.retain(job.id for job in jobs)
        for job in jobs:
            before = (job.state, job.current_round)
            try:
                self.advance(job)
                now = self.store.job(job.id)
                moved |= now is not None and (now.state, now.current_round) != before
            except Exception as e:  # one job's failure must not stop the others
                error_id = uuid.uuid4().hex[:12]
                log.exception("job %s: step failed (error id %s)", job.id, error_id)
                if not _transient(e):
                    # Never the exception's text: it may hold SQL or a file's content.
                    self.store.set_job_state(
                        job.id,
                        "failed",
                        error=f"internal error {error_id} while {job.state} "
                        f"({type(e).__name__}); the coordinator's log has the details",
                    )
        return moved

    def advance(self, job: Job) -> None:
        spec = JobSpec.model_validate(job.spec)
        step = {
            "waiting": self._waiting,
            "profiling": self._profiling,
            "training": self._training,
            "aggregating": self._aggregating,
            "evaluating": self._evaluating,
        }[job.state]
        step(job, spec)

    def _any_holder_alive(self, holders: Sequence[str]) -> bool:
        """Whether any of ``holders`` (workers holding an open task) still counts as alive.

        A holder last heard before this coordinator (re)started gets two heartbeat
        timeouts from the start (one to reconnect, its channel backoff is capped at 4 s,
        and one to be heard): it kept its task through the restart and is backing off,
        and judging it by the silence while nobody was listening would close its round
        without it. A holder heard since the start is judged as usual."""
        timeout = self.cadence.timeout_s
        alive = self.store.alive_worker_ids(timeout)
        if any(w in alive for w in holders):
            return True
        since_start = (utcnow() - self.started_at).total_seconds()
        if since_start >= 2 * timeout:
            return False
        heard = self.store.alive_worker_ids(max(since_start, 1e-3))
        return any(w not in heard for w in holders)

    def _notify(self) -> None:
        self.signals.tasks_created()

    # -- waiting and profiling -----------------------------------------------------------

    def _participants(self, spec: JobSpec, number: int) -> list[Worker] | None:
        alive = self.store.alive_workers(self.cadence.timeout_s)
        if len(alive) < spec.min_workers:
            return None
        want = spec.participants or math.ceil(spec.participation_fraction * len(alive))
        want = min(len(alive), max(want, spec.min_workers))
        # Drawn from workers in name order (ids break ties), as the simulator draws clients.
        ordered = sorted(alive, key=lambda w: (w.name, w.id))
        return sample_participants(ordered, want, spec.seed, number)

    def _waiting(self, job: Job, spec: JobSpec) -> None:
        number = job.current_round + 1
        participants = self._participants(spec, number)
        if participants is None:
            return
        profiles = self.store.profiles(job.id)
        missing = [w for w in participants if w.id not in profiles]
        deadline = utcnow() + timedelta(seconds=spec.profile_deadline_s)
        if not missing:
            self._assign(job, spec, number, [w.id for w in participants], profiles)
            return
        tasks = [
            Task(
                id=str(uuid.uuid4()),
                job_id=job.id,
                round=number,
                worker_id=w.id,
                kind="profile",
                modules=[],
                scores={},
                status="offered",
            )
            for w in missing
        ]
        self.store.open_round(
            job.id,
            number,
            state="profiling",
            participants=[w.id for w in participants],
            deadline_at=deadline,
            tasks=tasks,
        )
        log.info("job %s round %d: profiling %d workers", job.id, number, len(tasks))
        self._notify()

    def _profiling(self, job: Job, spec: JobSpec) -> None:
        number = job.current_round
        rnd = self.store.round(job.id, number)
        assert rnd is not None
        holders = [
            w
            for w, status in self.store.task_states(job.id, number, "profile")
            if status == "offered"
        ]
        # Woken by the report that brings the last profile in, not at the next tick.
        self.awaited[job.id] = len(holders)
        if holders and utcnow() < rnd.deadline_at and self._any_holder_alive(holders):
            return  # a worker that died while profiling need not hold the round
        for t in self.store.tasks(job.id, number, "profile") if holders else []:
            if t.status == "offered":
                self.store.set_task_status(t.id, "straggler", "no profile before the deadline")
        profiles = self.store.profiles(job.id)
        ready = [w for w in rnd.participants if w in profiles]
        if not ready:
            # Nobody could profile: start the round over with whoever is alive then.
            self.store.set_job_state(job.id, "waiting", current_round=number - 1)
            return
        self._assign(job, spec, number, ready, profiles)

    # -- assignment ----------------------------------------------------------------------

    def _ensure_initial_adapter(self, job: Job, spec: JobSpec, shapes: Mapping[str, Any]) -> None:
        if self.store.latest_version(job.id) is not None:
            return
        modules = unflatten_shapes(shapes)
        sha, size = self._store_adapter(flatten(initial_adapter(modules, seed=spec.seed)))
        self.store.commit_version(job.id, version=0, round_number=0, sha256=sha, byte_count=size)

    def _store_adapter(self, tensors: Mapping[str, np.ndarray]) -> tuple[str, int]:
        """Stream an adapter into the blob store chunk by chunk (no second full copy)."""
        payload = EncodedPayload(tensors)
        return self.blobs.put(payload.chunks(), expected_sha256=payload.sha256)

    def _global_shapes(self, job: Job) -> dict[str, list[int]]:
        version = self.store.latest_version(job.id)
        assert version is not None
        return {
            k: list(v.shape) for k, v in decode_tensors(self.blobs.read(version.sha256)).items()
        }

    def _assign(
        self,
        job: Job,
        spec: JobSpec,
        number: int,
        participant_ids: list[str],
        profiles: Mapping[str, Profile] | None = None,
    ) -> None:
        """``profiles``: the job's, when the caller just read them (thousands of memory
        models are worth reading once)."""
        profiles = self.store.profiles(job.id) if profiles is None else profiles
        # Shapes most participants agree on (each checked against the model and the spec
        # when reported), never one worker's alone.
        agreed = agreed_shapes([profiles[w].tensors for w in participant_ids])
        self._ensure_initial_adapter(job, spec, agreed)
        shapes = self._global_shapes(job)
        version = self.store.latest_version(job.id)
        assert version is not None
        stats = self.store.module_stats(job.id)
        # Each worker's latest reported local scores, also from before a round it skipped.
        previous = latest_scores(
            {u.worker_id: u.local_scores for u in self.store.updates(job.id, r)}
            for r in range(1, number)
        )
        clients, refused = [], []
        for wid in participant_ids:
            p = profiles[wid]
            if p.tensors != shapes:
                refused.append((wid, "profiled adapter tensors differ from the global adapter"))
                continue
            profile = WorkerProfile(memory_from_json(p.memory), p.budget_bytes)
            clients.append(Participant(wid, profile, previous.get(wid, {})))
        solve_start = time.perf_counter()
        assignments = plan_assignments(
            clients,
            stats,
            strategy=spec.strategy,
            ig_lambda=spec.ig_lambda,
            seed=spec.seed,
            number=number,
        )
        solve_seconds = time.perf_counter() - solve_start
        metrics.ASSIGN_SECONDS.observe(solve_seconds)
        self._assign_seconds[(job.id, number)] = solve_seconds
        tasks = []
        for a in assignments:
            ok = a.feasible and bool(a.modules)
            tasks.append(
                Task(
                    id=str(uuid.uuid4()),
                    job_id=job.id,
                    round=number,
                    worker_id=a.client,
                    kind="train",
                    modules=list(a.modules),
                    predicted_bytes=a.predicted_bytes,
                    value=a.value,
                    scores={},
                    adapter_version=version.version,
                    status="offered" if ok else "refused",
                    reason=None if ok else (a.reason or "no module fits the budget"),
                )
            )
        tasks += [
            Task(
                id=str(uuid.uuid4()),
                job_id=job.id,
                round=number,
                worker_id=wid,
                kind="train",
                modules=[],
                scores={},
                adapter_version=version.version,
                status="refused",
                reason=why,
            )
            for wid, why in refused
        ]
        self.store.open_round(
            job.id,
            number,
            state="training",
            participants=participant_ids,
            deadline_at=utcnow() + timedelta(seconds=spec.round_deadline_s),
            tasks=tasks,
        )
        log.info(
            "job %s round %d: %d training tasks",
            job.id,
            number,
            sum(t.status == "offered" for t in tasks),
        )
        self._notify()

    # -- training ------------------------------------------------------------------------

    def _training(self, job: Job, spec: JobSpec) -> None:
        number = job.current_round
        rnd = self.store.round(job.id, number)
        assert rnd is not None
        states = self.store.task_states(job.id, number, "train")
        assigned = [w for w, status in states if status in ("offered", "done", "straggler")]
        offered = [w for w, status in states if status == "offered"]
        done = [w for w, status in states if status == "done"]
        self.awaited[job.id] = len(offered)
        now = utcnow()
        quorum = max(1, math.ceil(spec.quorum * len(assigned)))
        if offered and now < rnd.deadline_at:
            # Before the deadline the round closes early only when the quorum is in and
            # every worker still training has stopped heartbeating: a crashed worker
            # must not hold everyone until the deadline.
            if len(done) < quorum:
                return
            if self._any_holder_alive(offered):
                return
        if offered and len(done) < quorum:
            grace = rnd.deadline_at + timedelta(seconds=spec.round_deadline_s)
            if now < grace:
                return
            self.store.set_job_state(
                job.id,
                "failed",
                error=f"round {number}: {len(done)} of {len(assigned)} updates by the deadline, "
                f"quorum is {quorum}",
            )
            metrics.ROUNDS.labels(outcome="failed").inc()
            return
        if not done:
            self.store.set_job_state(
                job.id, "failed", error=f"round {number}: no worker could train any module"
            )
            return
        why = "missed the round deadline" if now >= rnd.deadline_at else "stopped heartbeating"
        stragglers = self.store.close_training(job.id, number, why)
        metrics.STRAGGLERS.inc(len(stragglers))
        if stragglers:
            log.info("job %s round %d: stragglers %s (%s)", job.id, number, stragglers, why)
        self._aggregating(job, spec)

    # -- aggregation ---------------------------------------------------------------------

    def _previous_modules(
        self, job_id: str, version: int
    ) -> dict[str, dict[str, np.ndarray]] | None:
        """The global adapter one version before ``version`` (server momentum's only state)."""
        previous = self.store.version(job_id, version - 1) if version > 0 else None
        if previous is None:
            return None
        return unflatten(decode_tensors(self.blobs.read(previous.sha256)))

    def _aggregating(self, job: Job, spec: JobSpec) -> None:
        number = job.current_round
        latest = self.store.latest_version(job.id)
        assert latest is not None
        if latest.version >= number:  # committed before a crash: nothing to redo
            self.store.set_job_state(job.id, "evaluating")
            return
        start = time.perf_counter()
        rnd = self.store.round(job.id, number)
        assert rnd is not None
        global_modules = unflatten(decode_tensors(self.blobs.read(latest.sha256)))
        agg = spec.aggregation
        aggregator = Aggregator(
            global_modules,
            self.store.module_stats(job.id),
            number,
            rule=agg.rule,
            merge=agg.merge,
            dwa=agg.dwa.config(),
            ema_decay=agg.ema_decay,
            momentum=agg.momentum,
            previous=self._previous_modules(job.id, latest.version) if agg.momentum else None,
            restart=agg.restart,
        )
        # A fixed order (worker name, then id), not arrival: same round, same bits.
        names = self.store.worker_names()
        updates = fixed_order(
            self.store.updates(job.id, number),
            key=lambda u: (names.get(u.worker_id, ""), u.worker_id),
        )
        used, bytes_in, weighted = [], 0, {"before": 0.0, "after": 0.0, "n": 0}
        for u in updates:
            try:
                # The receiver checked every value finite before the blob was stored.
                packed = Packed(*decode_packed(self.blobs.read(u.sha256)))
                aggregator.add(ClientUpdate(u.worker_id, u.num_samples, packed=packed, finite=True))
            except (UpdateError, ValueError) as e:
                self.store.record_rejection(
                    "aggregation", str(e), job_id=job.id, round_number=number, worker_id=u.worker_id
                )
                continue
            used.append(u)
            bytes_in += u.byte_count
            weighted["before"] += u.loss_before * u.num_samples
            weighted["after"] += u.loss_after * u.num_samples
            weighted["n"] += u.num_samples
        result = aggregator.result()
        sha, size = self._store_adapter(flatten(result.modules))
        seconds = time.perf_counter() - start
        tasks = self.store.tasks(job.id, number, "train")
        n = max(1, int(weighted["n"]))
        round_metrics = {
            **rnd.metrics,
            "train_loss_before": weighted["before"] / n,
            "train_loss_after": weighted["after"] / n,
            "updates": len(used),
            "samples": int(weighted["n"]),
            "momentum_restarts": len(result.restarted),
            "bytes_in": bytes_in,
            "bytes_out": latest.byte_count * sum(t.status in ("done", "straggler") for t in tasks),
            "aggregate_seconds": seconds,
            "assign_seconds": self._assign_seconds.pop((job.id, number), None),
            "transfer_seconds": (
                max(u.received_at for u in used) - min(t.created_at for t in tasks)
            ).total_seconds()
            if used and tasks
            else None,
            "round_seconds": (utcnow() - rnd.started_at).total_seconds(),
        }
        committed = self.store.commit_version(
            job.id,
            version=number,
            round_number=number,
            sha256=sha,
            byte_count=size,
            stats=result.stats,
            close_round={"state": "closed", "metrics": round_metrics},
            job_state="evaluating",
        )
        if committed:
            metrics.AGGREGATE_SECONDS.observe(seconds)
            metrics.ROUND_SECONDS.observe(round_metrics["round_seconds"])
            metrics.ROUNDS.labels(outcome="closed").inc()
            log.info(
                "job %s round %d: aggregated %d updates into version %d",
                job.id,
                number,
                len(used),
                number,
            )
        else:
            self.store.set_job_state(job.id, "evaluating")

    # -- evaluation and the next round -----------------------------------------------------

    def _evaluating(self, job: Job, spec: JobSpec) -> None:
        number = job.current_round
        rnd = self.store.round(job.id, number)
        assert rnd is not None
        if self.evaluator is not None and spec.eval_dataset and "eval_loss" not in rnd.metrics:
            version = self.store.version(job.id, number)
            assert version is not None
            modules = unflatten(decode_tensors(self.blobs.read(version.sha256)))
            scores = self.evaluator(spec, modules)
            self.store.set_round(job.id, number, metrics={**rnd.metrics, **scores})
            if "eval_accuracy" in scores:  # classification; a causal LM has perplexity
                metrics.GLOBAL_ACCURACY.labels(job=job.id).set(scores["eval_accuracy"])
            metrics.GLOBAL_LOSS.labels(job=job.id).set(scores["eval_loss"])
            log.info("job %s round %d: %s", job.id, number, scores)
        if number >= spec.rounds:
            self.store.set_job_state(job.id, "done")
            log.info("job %s: done after %d rounds", job.id, number)
            return
        self.store.set_job_state(job.id, "waiting")
        self._waiting(self.store.job(job.id) or job, spec)


def unflatten_shapes(shapes: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
    out: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        module, _, part = key.rpartition("/")
        out.setdefault(module, {})[part] = list(shape)
    return out


def _transient(error: Exception) -> bool:
    """A step that failed for a reason that passes (the database out of reach, every
    pooled connection busy, a file system hiccup): the job stays, the next tick retries.
    At 2,000 workers a pool wait that ran out used to fail the whole job."""
    return isinstance(error, (*TRANSIENT_ERRORS, OSError))
