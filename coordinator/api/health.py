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


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (liveness)."""
    return {"status": "ok"}


def _readiness(ctx: Context) -> Readiness:
    try:
        with ctx.store.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision = migrate.current_revision(ctx.store.engine)
    except Exception:  # any failure to reach the database means not ready
        return Readiness(database=False, migrations_current=False, revision=None)
    return Readiness(
        database=True, migrations_current=revision == migrate.head_revision(), revision=revision
    )


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(ctx: Context) -> JSONResponse:
    """The database is reachable and at the newest migration (readiness)."""
    ready = await run_in_threadpool(_readiness, ctx)
    code = 200 if ready.database and ready.migrations_current else 503
    return JSONResponse(ready.model_dump(), status_code=code)


@router.get("/metrics", response_class=Response)
def prometheus() -> Response:
    """Prometheus text exposition of the coordinator's metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
