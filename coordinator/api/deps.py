"""Shared request dependencies: the coordinator's state and bearer-token authentication."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fedpilot.coordinator import metrics
from fedpilot.coordinator.db.blobs import BlobStore
from fedpilot.coordinator.db.store import Store
from fedpilot.coordinator.settings import CoordinatorSettings


@dataclass
class ApiContext:
    store: Store
    blobs: BlobStore
    settings: CoordinatorSettings
    export_cache: dict[tuple[str, int], bytes] = field(default_factory=dict)
    """Zipped adapters by (job, version): a committed version never changes."""


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
    expected = ctx.settings.api_token.get_secret_value()
    if not expected:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        metrics.REJECTIONS.labels(reason="api_unauthorized").inc()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


Authorized = Depends(require_token)
