"""Liveness, readiness and Prometheus exposition (unauthenticated, outside ``/api/v1``)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from fedpilot.coordinator.api.deps import Context
from fedpilot.coordinator.api.schemas import Readiness
from fedpilot.coordinator.db import migrate

router = APIRouter(tags=["operations"])


@router.get("/healthz", responses={503: {"description": "The round driver thread died."}})
def healthz(ctx: Context) -> JSONResponse:
    """The process answers and its round driver runs (liveness: a restart would help)."""
    driver = ctx.driver() if ctx.driver is not None else None
    if driver is not None and not driver.alive:
        return JSONResponse({"status": "round driver stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


def _readiness(ctx: Context) -> Readiness:
    try:
        with ctx.store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = migrate.current_revision(ctx.store.engine)
    except Exception:  # any failure to reach the database means not ready
        return Readiness(database=False, migrations_current=False, revision=None)
    driver = ctx.driver() if ctx.driver is not None else None
    return Readiness(
        database=True,
        migrations_current=revision == migrate.head_revision(),
        revision=revision,
        driver_running=None if driver is None else driver.alive and not driver.stalled,
        driver_seconds_since_loop=None if driver is None else driver.seconds_since_loop,
        driver_errors=None if driver is None else driver.errors,
    )


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(ctx: Context) -> JSONResponse:
    """The database is reachable and at the newest migration (readiness)."""
    ready = await run_in_threadpool(_readiness, ctx)
    ok = ready.database and ready.migrations_current and ready.driver_running is not False
    code = 200 if ok else 503
    return JSONResponse(ready.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response)
def prometheus() -> Response:
    """Prometheus text exposition of the coordinator's metrics (needs the API token when one
    is configured; per-worker series are labelled by worker id)."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
