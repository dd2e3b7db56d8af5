"""The FastAPI application of the coordinator."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fedpilot import __version__
from fedpilot.coordinator import metrics
from fedpilot.coordinator.api import health, jobs, workers
from fedpilot.coordinator.api.deps import ApiContext
from fedpilot.coordinator.api.middleware import RequestGuard

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"

MAX_ERRORS = 20
"""Validation errors listed in one 422 (the rest are counted)."""


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """The errors of a 422 without the input that caused them: a refused body is never
    echoed back (it may be large, or hold NaN that JSON cannot carry)."""
    out: list[dict[str, Any]] = []
    for error in exc.errors()[:MAX_ERRORS]:
        out.append(
            {
                "type": str(error.get("type", "value_error"))[:100],
                "loc": [str(part)[:100] for part in error.get("loc", ())][:10],
                "msg": str(error.get("msg", ""))[:300],
            }
        )
    return out


def create_app(ctx: ApiContext) -> FastAPI:
    app = FastAPI(
        title="fedpilot coordinator",
        version=__version__,
        description="Submit and watch federated LoRA fine-tuning jobs. Every `/api/v1` "
        "endpoint needs `Authorization: Bearer <token>` when the coordinator has a token.",
    )
    app.state.ctx = ctx

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        """Count refused requests (bad job specs, ids, bodies) like refused uploads."""
        metrics.REJECTIONS.labels(reason="api_invalid_request").inc()
        errors = validation_errors(exc)
        more = len(exc.errors()) - len(errors)
        body: dict[str, Any] = {"detail": errors}
        if more > 0:
            body["more_errors"] = more
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        """An unexpected failure: an error id for the log, never its text."""
        error_id = uuid.uuid4().hex[:12]
        log.error(
            "internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc
        )
        return JSONResponse({"detail": f"internal error {error_id}"}, status_code=500)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(jobs.router)
    api.include_router(workers.router)
    app.include_router(api)
    app.include_router(health.router)
    try:
        from fedpilot.dashboard import routes as dashboard
    except ImportError:  # the dashboard is optional; the API works without it
        log.warning("dashboard not installed; serving the API only")
    else:
        app.include_router(dashboard.router)
    app.add_middleware(RequestGuard, ctx=ctx)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the job spec, whose body the submit route parses itself."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from fedpilot.coordinator.jobspec import JobSpec

        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec.pop("$defs", {}))
        components["JobSpec"] = spec
        app.openapi_schema = schema
    return app.openapi_schema
