"""``/api/v1/workers``: who is connected, with what budget and last profile."""

from __future__ import annotations

from fastapi import APIRouter

from fedpilot.coordinator.api import views
from fedpilot.coordinator.api.deps import Authorized, Context
from fedpilot.coordinator.api.schemas import UNAUTHORIZED, WorkerInfo

router = APIRouter(
    prefix="/workers", tags=["workers"], dependencies=[Authorized], responses=UNAUTHORIZED
)


@router.get("", response_model=list[WorkerInfo])
def list_workers(ctx: Context) -> list[WorkerInfo]:
    return views.workers(ctx.store, ctx.cadence.timeout_s)
