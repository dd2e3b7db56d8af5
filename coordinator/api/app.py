"""The FastAPI application of the coordinator."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI

from fedpilot import __version__
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
