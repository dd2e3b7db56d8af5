"""Read models of the REST API, assembled from the store (no writes here)."""

from __future__ import annotations

import re
from datetime import timedelta

from fedpilot.coordinator.api.deps import ApiContext
from fedpilot.coordinator.api.schemas import (
    Assignment,
    JobDetail,
    JobSummary,
    ModuleInfo,
    ProfileInfo,
    RejectionInfo,
    RoundDetail,
    RoundSummary,
    TaskProblem,
    WorkerInfo,
    clean_metrics,
    finite,
)
from fedpilot.coordinator.db.models import Job, Round, Task, Worker
from fedpilot.coordinator.db.store import Store, utcnow
from fedpilot.coordinator.jobspec import JobSpec
from fedpilot.core.memory import HEAD_LAYER

_SETTLED_FINE = ("done", "abandoned")
"""Task states that are not a worker's problem (``abandoned``: the job was cancelled)."""
_WORKER_REASON = re.compile(r"ERROR_REASON_([A-Z0-9_]+): (.*)", re.DOTALL)
"""How the gRPC service stores a worker's RefuseTask on the task row."""


def task_problem(task: Task, worker: Worker | None) -> TaskProblem | None:
    """The task's reason for not completing, split into the worker's reason and message."""
    if task.status in _SETTLED_FINE or task.status == "offered":
        return None
    text = task.reason or ""
    sent = _WORKER_REASON.fullmatch(text)
    return TaskProblem(
        task_id=task.id,
        job_id=task.job_id,
        round=task.round,
        kind=task.kind,
        worker_id=task.worker_id,
        worker_name=worker.name if worker else None,
        status=task.status,
        reason=sent.group(1) if sent else task.status,
        message=sent.group(2) if sent else text,
        at=task.updated_at,
    )


def problems(
    store: Store, job_id: str | None = None, workers: list[Worker] | None = None
) -> dict[str, TaskProblem]:
    """Per worker, why its latest settled task (of ``job_id``, or of any job) did not complete."""
    names = {w.id: w for w in (store.workers() if workers is None else workers)}
    out = {}
    for wid, task in store.latest_settled_tasks(job_id).items():
        problem = task_problem(task, names.get(wid))
        if problem is not None:
            out[wid] = problem
    return out


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def round_summary(rnd: Round) -> RoundSummary:
    m = rnd.metrics or {}
    return RoundSummary(
        number=rnd.number,
        state=rnd.state,
        participants=len(rnd.participants or []),
        stragglers=len(rnd.stragglers or []),
        started_at=rnd.started_at,
        closed_at=rnd.closed_at,
        deadline_at=rnd.deadline_at,
        eval_accuracy=finite(m.get("eval_accuracy")),
        eval_loss=finite(m.get("eval_loss")),
        train_loss_before=finite(m.get("train_loss_before")),
        train_loss_after=finite(m.get("train_loss_after")),
        round_seconds=finite(m.get("round_seconds")),
        bytes_in=_int(m.get("bytes_in")),
        bytes_out=_int(m.get("bytes_out")),
    )


def _spec_field(job: Job, name: str, default: object) -> object:
    return (job.spec or {}).get(name, default)


def job_summary(store: Store, job: Job, rounds: list[Round] | None = None) -> JobSummary:
    rounds = store.rounds(job.id) if rounds is None else rounds
    accuracy = next(
        (
            finite(r.metrics.get("eval_accuracy"))
            for r in reversed(rounds)
            if r.metrics and "eval_accuracy" in r.metrics
        ),
        None,
    )
    return JobSummary(
        id=job.id,
        name=job.name,
        state=job.state,
        current_round=job.current_round,
        rounds=int(_spec_field(job, "rounds", 0)),  # type: ignore[call-overload]
        strategy=str(_spec_field(job, "strategy", "")),
        created_at=job.created_at,
        updated_at=job.updated_at,
        error=job.error,
        eval_accuracy=accuracy,
    )


def modules(store: Store, job_id: str) -> list[ModuleInfo]:
    profiles = store.profiles(job_id)
    if not profiles:
        return []
    newest = max(profiles.values(), key=lambda p: p.created_at)
    stats = store.module_stats(job_id)
    entries = newest.memory.get("modules", [])
    order = sorted(entries, key=lambda m: (m["layer"] == HEAD_LAYER, m["layer"], m["name"]))
    out = []
    for m in order:
        st = stats.get(m["name"])
        out.append(
            ModuleInfo(
                name=m["name"],
                layer=m["layer"],
                update_count=st.update_count if st else 0,
                last_round=st.last_round if st else None,
                score=finite(st.score) if st else None,
            )
        )
    return out


def job_detail(store: Store, job: Job) -> JobDetail:
    rounds = store.rounds(job.id)
    summary = job_summary(store, job, rounds)
    latest = store.latest_version(job.id)
    return JobDetail(
        **summary.model_dump(),
        spec=job.spec,
        history=[round_summary(r) for r in rounds],
        modules=modules(store, job.id),
        adapter_version=latest.version if latest else None,
        adapter_sha256=latest.sha256 if latest else None,
        problems=sorted(
            problems(store, job.id).values(), key=lambda p: (p.worker_name or "", p.worker_id)
        ),
    )


def round_detail(store: Store, job: Job, number: int) -> RoundDetail | None:
    rnd = store.round(job.id, number)
    if rnd is None:
        return None
    names = {w.id: w for w in store.workers()}
    profiles = store.profiles(job.id)
    updates = {u.worker_id: u for u in store.updates(job.id, number)}
    assignments = []
    for t in store.tasks(job.id, number):
        u = updates.get(t.worker_id) if t.kind == "train" else None
        worker = names.get(t.worker_id)
        profile = profiles.get(t.worker_id)
        budget = profile.budget_bytes if profile else (worker.budget_bytes if worker else None)
        assignments.append(
            Assignment(
                task_id=t.id,
                worker_id=t.worker_id,
                worker_name=worker.name if worker else None,
                kind=t.kind,
                status=t.status,
                reason=t.reason,
                modules=list(t.modules or []),
                budget_bytes=budget,
                predicted_bytes=t.predicted_bytes,
                measured_peak_bytes=u.measured_peak_bytes if u else None,
                value=finite(t.value),
                num_samples=u.num_samples if u else None,
                loss_before=finite(u.loss_before) if u else None,
                loss_after=finite(u.loss_after) if u else None,
                train_seconds=finite(u.train_seconds) if u else None,
                upload_bytes=u.byte_count if u else None,
            )
        )
    rejections = [
        RejectionInfo(
            at=r.at, round=r.round, worker_id=r.worker_id, reason=r.reason, message=r.message
        )
        for r in store.rejections(job.id)
        if r.round == number
    ]
    summary = round_summary(rnd)
    return RoundDetail(
        **summary.model_dump(),
        job_id=job.id,
        participant_ids=list(rnd.participants or []),
        straggler_ids=list(rnd.stragglers or []),
        metrics=clean_metrics(rnd.metrics or {}),
        assignments=assignments,
        rejections=rejections,
        bytes_moved=(summary.bytes_in or 0) + (summary.bytes_out or 0),
    )


def workers(store: Store, heartbeat_timeout_s: float) -> list[WorkerInfo]:
    since = utcnow() - timedelta(seconds=heartbeat_timeout_s)
    profiles = store.latest_profiles()
    rows = store.workers()
    trouble = problems(store, workers=rows)
    out = []
    for w in rows:
        p = profiles.get(w.id)
        out.append(
            WorkerInfo(
                id=w.id,
                name=w.name,
                alive=w.last_heartbeat >= since,
                state=w.state,
                labels=w.labels or {},
                device=w.device or {},
                budget_bytes=w.budget_bytes,
                current_task=w.current_task,
                registered_at=w.registered_at,
                last_heartbeat=w.last_heartbeat,
                last_profile=ProfileInfo(
                    job_id=p.job_id,
                    method=p.method,
                    device=p.device,
                    budget_bytes=p.budget_bytes,
                    base_bytes=_int(p.memory.get("base_bytes")),
                    modules=len(p.memory.get("modules", [])),
                    created_at=p.created_at,
                )
                if p
                else None,
                problem=trouble.get(w.id),
            )
        )
    return out


def adapter_zip(ctx: ApiContext, job: Job, version: int | None) -> tuple[bytes, int]:
    """Zip of the job's adapter ``version`` (latest when None); cached, versions are immutable."""
    from fedpilot.coordinator.export import adapter_zip as build
    from fedpilot.core.aggregation import unflatten
    from fedpilot.wire.payload import decode_tensors

    row = (
        ctx.store.latest_version(job.id) if version is None else ctx.store.version(job.id, version)
    )
    if row is None:
        which = "adapter version" if version is None else f"adapter version {version}"
        raise LookupError(f"job {job.id} has no {which} yet")
    key = (job.id, row.version)
    if key not in ctx.export_cache:
        modules = unflatten(decode_tensors(ctx.blobs.read(row.sha256)))
        ctx.export_cache.clear()  # keep one: zips of large adapters are not small
        ctx.export_cache[key] = build(JobSpec.model_validate(job.spec), modules)
    return ctx.export_cache[key], row.version
