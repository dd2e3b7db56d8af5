"""``/api/v1/jobs``: submit, list, inspect and cancel jobs; export the global adapter."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from fedpilot.coordinator import modelcheck, paths
from fedpilot.coordinator.api import views
from fedpilot.coordinator.api.deps import ApiContext, Authorized, Context
from fedpilot.coordinator.api.schemas import (
    NOT_FOUND,
    UNAUTHORIZED,
    JobCreated,
    JobDetail,
    JobSummary,
    Problem,
    RoundDetail,
)
from fedpilot.coordinator.db.models import Job
from fedpilot.coordinator.export import ExportError
from fedpilot.coordinator.jobspec import JobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Authorized], responses=UNAUTHORIZED)

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
JobId = Annotated[str, Path(pattern=UUID_PATTERN, description="Job id (a UUID).")]
RoundNumber = Annotated[int, Path(ge=1, le=1_000_000)]


def _job(ctx: Context, job_id: str) -> Job:
    job = ctx.store.job(job_id.lower())
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


class FieldError(BaseModel):
    type: str
    loc: list[str]
    msg: str


class InvalidRequest(BaseModel):
    """A refused job spec: what is wrong where (the input is never echoed)."""

    detail: list[FieldError]
    more_errors: int | None = None


JOB_SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}
"""The body as OpenAPI documents it; it is parsed by :func:`parse_spec` in a thread."""


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobCreated,
    responses={
        400: {"model": Problem, "description": "The body is not JSON."},
        413: {"model": Problem, "description": "The body exceeds http_max_body_bytes."},
        422: {"model": InvalidRequest, "description": "The spec is invalid (fields named)."},
    },
    openapi_extra=JOB_SPEC_BODY,
)
async def submit(request: Request, ctx: Context) -> JobCreated:
    """Submit a job. A spec that fails validation gets 422 naming the field.

    ``model`` and ``eval_dataset`` must lie under the coordinator's data roots
    (``data_roots``): it reads the model's config.json, and the evaluation data and
    model when it evaluates. Outside them the answer is the same whether the file
    exists or not, and no file is opened."""
    body = await request.body()  # bounded by the middleware before it was read
    # Parsing and validating up to a megabyte takes ~0.2 s: not on the event loop.
    return await run_in_threadpool(_submit, body, ctx)


def parse_spec(body: bytes) -> JobSpec:
    """The job spec in a JSON body, or a RequestValidationError naming the fields."""
    try:
        return JobSpec.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        ) from None


def _submit(body: bytes, ctx: ApiContext) -> JobCreated:
    spec = parse_spec(body)
    roots = paths.data_roots(ctx.settings)
    outside = [
        field
        for field in ("model", "eval_dataset")
        if getattr(spec, field) and paths.confined(getattr(spec, field), roots) is None
    ]
    if outside:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", field),
                    "msg": paths.outside_message(field, roots),
                    "input": None,
                }
                for field in outside
            ]
        )
    found = modelcheck.problems(spec)
    if found:
        raise RequestValidationError(
            [
                {"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": None}
                for loc, msg in found
            ]
        )
    job_id = ctx.store.create_job(spec.name, spec.model_dump(mode="json"))
    return JobCreated(id=job_id)


@router.get("", response_model=list[JobSummary])
def list_jobs(
    ctx: Context,
    state: Annotated[
        str | None,
        Query(max_length=20, pattern=r"^[a-z]+$", description="Only jobs in this state."),
    ] = None,
) -> list[JobSummary]:
    jobs = ctx.store.jobs([state] if state else None)
    return [views.job_summary(ctx.store, job) for job in reversed(jobs)]


@router.get("/{job_id}", response_model=JobDetail, responses=NOT_FOUND)
def get_job(job_id: JobId, ctx: Context) -> JobDetail:
    return views.job_detail(ctx.store, _job(ctx, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobDetail,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The job already ended."}},
)
def cancel(job_id: JobId, ctx: Context) -> JobDetail:
    """Stop a job: its open round closes, offered tasks are withdrawn, uploads are refused."""
    job = _job(ctx, job_id)
    if not ctx.store.cancel_job(job.id):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already ended ({job.state})")
    return views.job_detail(ctx.store, _job(ctx, job_id))


@router.get("/{job_id}/rounds/{number}", response_model=RoundDetail, responses=NOT_FOUND)
def get_round(job_id: JobId, number: RoundNumber, ctx: Context) -> RoundDetail:
    job = _job(ctx, job_id)
    detail = views.round_detail(ctx.store, job, number)
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} has no round {number}")
    return detail


@router.get(
    "/{job_id}/adapter",
    response_class=Response,
    responses={
        200: {
            "content": {"application/zip": {}},
            "description": "adapter_config.json + adapter_model.safetensors (PEFT format).",
        },
        404: {"model": Problem, "description": "Unknown job, or no adapter version yet."},
        501: {"model": Problem, "description": "The coordinator cannot read the model's config."},
    },
)
async def adapter(
    job_id: JobId,
    ctx: Context,
    version: Annotated[
        int | None, Query(ge=0, le=1_000_000, description="Default: the latest.")
    ] = None,
) -> Response:
    """The global adapter as a zipped PEFT adapter directory (``PeftModel.from_pretrained``)."""
    job = await run_in_threadpool(_job, ctx, job_id)
    try:
        data, number = await run_in_threadpool(views.adapter_zip, ctx, job, version)
    except LookupError as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from e
    except ExportError as e:
        raise HTTPException(status.HTTP_501_NOT_IMPLEMENTED, f"cannot export: {e}") from e
    filename = f"fedpilot-{job.id[:8]}-v{number}.zip"
    return Response(
        data,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Fedpilot-Adapter-Version": str(number),
        },
    )
