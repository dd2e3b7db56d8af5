"""Shared request dependencies: the coordinator's state and bearer-token authentication."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedpilot.coordinator import metrics
from fedpilot.coordinator.cadence import HeartbeatCadence
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.db.store import Store
from fedpilot.coordinator.settings import CoordinatorSettings


@dataclass(frozen=True)
class DriverStatus:
    """Whether the round driver thread runs and when it last finished a loop."""

    alive: bool
    seconds_since_loop: float
    stalled: bool
    errors: int


@dataclass
class ApiContext:
    store: Store
    blobs: BlobStore
    settings: CoordinatorSettings
    cadence: HeartbeatCadence
    """The round driver's heartbeat cadence: who counts as alive."""
    export_cache: dict[tuple[str, int], bytes] = field(default_factory=dict)
    """Zipped adapters by (job, version): a committed version never changes."""
    driver: Callable[[], DriverStatus] | None = None
    """The round driver's health (None: no driver in this process)."""


def context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Context = Annotated[ApiContext, Depends(context)]

_bearer = HTTPBearer(auto_error=False, description="The coordinator's API token.")


def require_token(
    ctx: Context,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Reject the request unless it carries the configured token (constant-time compare).

    With no token configured the HTTP server listens on loopback only (see
    ``server.start``), so every local caller is trusted.
    """
    given = credentials.credentials if credentials is not None else ""
    if not token_ok(ctx.settings, given):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def token_ok(settings: CoordinatorSettings, given: str) -> bool:
    """The configured token is ``given`` (always true when none is configured); a refusal
    is counted."""
    expected = settings.api_token.get_secret_value()
    if not expected:
        return True
    if hmac.compare_digest(given.encode(errors="replace"), expected.encode()):
        return True
    metrics.REJECTIONS.labels(reason="api_unauthorized").inc()
    return False


Authorized = Depends(require_token)
