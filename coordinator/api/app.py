"""The FastAPI application of the coordinator."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError

from fedpilot import __version__
from fedpilot.coordinator import metrics
from fedpilot.coordinator.api import health, jobs, workers
from fedpilot.coordinator.api.deps import ApiContext

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


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
        return await request_validation_exception_handler(request, exc)

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
    return app
