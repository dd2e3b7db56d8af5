"""Response bodies of the REST API (request bodies are :class:`JobSpec`)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


def finite(value: Any) -> float | None:
    """JSON has no NaN/Inf: report a non-finite metric as null rather than fail the response."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def clean_metrics(values: dict[str, Any]) -> dict[str, float | int | None]:
    return {
        k: (v if isinstance(v, int) and not isinstance(v, bool) else finite(v))
        for k, v in values.items()
    }


class Problem(BaseModel):
    """Why a request was refused."""

    detail: str


UNAUTHORIZED: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "Missing or invalid bearer token."}
}
NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": Problem, "description": "No such job, round or adapter version."}
}


class JobCreated(BaseModel):
    id: str


class RoundSummary(BaseModel):
    number: int
    state: str
    participants: int
    stragglers: int
    started_at: datetime
    closed_at: datetime | None
    deadline_at: datetime | None
    eval_accuracy: float | None = None
    eval_loss: float | None = None
    train_loss_before: float | None = None
    train_loss_after: float | None = None
    round_seconds: float | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


class ModuleInfo(BaseModel):
    name: str
    layer: int
    update_count: int = 0
    last_round: int | None = None
    score: float | None = None


class JobSummary(BaseModel):
    id: str
    name: str
    state: str
    current_round: int
    rounds: int
    strategy: str
    created_at: datetime
    updated_at: datetime
    error: str | None = None
    eval_accuracy: float | None = Field(None, description="Of the newest evaluated round.")


class TaskProblem(BaseModel):
    """Why a worker's task did not complete: its own refusal or failure (reason and message
    as the worker sent them) or the coordinator's note (a straggler, an assignment refused)."""

    task_id: str
    job_id: str
    round: int
    kind: str
    worker_id: str
    worker_name: str | None
    status: str = Field(description="The task's status: refused, straggler, ...")
    reason: str = Field(
        description="The worker's error reason (MALFORMED, OUT_OF_MEMORY, ...) when it sent "
        "one, else the task's status."
    )
    message: str
    at: datetime


class JobDetail(JobSummary):
    spec: dict[str, Any]
    history: list[RoundSummary]
    modules: list[ModuleInfo] = Field(
        description="Every LoRA module of the job's model, bottom layer first (empty until "
        "a worker has profiled the model)."
    )
    adapter_version: int | None = None
    adapter_sha256: str | None = None
    problems: list[TaskProblem] = Field(
        default_factory=list,
        description="Workers whose latest settled task of this job did not complete, and why.",
    )


class Assignment(BaseModel):
    task_id: str
    worker_id: str
    worker_name: str | None
    kind: str
    status: str
    reason: str | None
    modules: list[str]
    budget_bytes: int | None
    predicted_bytes: int
    measured_peak_bytes: int | None = None
    value: float | None
    num_samples: int | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    train_seconds: float | None = None
    upload_bytes: int | None = None


class RejectionInfo(BaseModel):
    at: datetime
    round: int | None
    worker_id: str | None
    reason: str
    message: str


class RoundDetail(RoundSummary):
    job_id: str
    participant_ids: list[str]
    straggler_ids: list[str]
    metrics: dict[str, float | int | None]
    assignments: list[Assignment]
    rejections: list[RejectionInfo]
    bytes_moved: int


class ProfileInfo(BaseModel):
    job_id: str
    method: str
    device: str
    budget_bytes: int
    base_bytes: int | None
    modules: int
    created_at: datetime


class WorkerInfo(BaseModel):
    id: str
    name: str
    alive: bool
    state: str
    labels: dict[str, Any]
    device: dict[str, Any]
    budget_bytes: int
    current_task: str | None
    registered_at: datetime
    last_heartbeat: datetime
    last_profile: ProfileInfo | None
    problem: TaskProblem | None = Field(
        None, description="Why the worker's latest settled task did not complete, if it did not."
    )


class Readiness(BaseModel):
    database: bool
    migrations_current: bool
    revision: str | None
    driver_running: bool | None = None
    """The round driver thread is alive and finished a loop within ``driver_stall_s``."""
    driver_seconds_since_loop: float | None = None
    driver_errors: int | None = None
    """Driver loops that failed (logged, counted, carried on)."""
