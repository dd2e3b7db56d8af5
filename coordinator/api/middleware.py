"""The HTTP server's first line: authentication before the body, and a body size limit
before parsing.

A pure ASGI middleware, so nothing reaches FastAPI's body parsing (on the event
loop) unless the caller holds the token and the body fits
``http_max_body_bytes``; an oversized or anonymous body costs the server no
more than its headers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedpilot.coordinator import metrics
from fedpilot.coordinator.api.deps import ApiContext, token_ok

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED = ("/api/",)
"""Path prefixes that need the token (``/metrics`` too when a token is configured)."""


async def _answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class RequestGuard:
    def __init__(self, app: App, ctx: ApiContext) -> None:
        self.app = app
        self.ctx = ctx

    def _protected(self, path: str) -> bool:
        return path.startswith(PROTECTED) or path == "/metrics"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._protected(scope.get("path", "")):
            raw = _header(scope, b"authorization") or b""
            scheme, _, token = raw.decode("latin-1").partition(" ")
            if not token_ok(self.ctx.settings, token if scheme.lower() == "bearer" else ""):
                await _answer(
                    send,
                    401,
                    "missing or invalid bearer token",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        limit = self.ctx.settings.http_max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await _answer(send, 400, "Content-Length is not a number")
                return
            if too_large:
                await self._too_large(send, limit)
                return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        # Read the (bounded) body here, counting as it arrives, then hand it on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, limit: int) -> None:
        metrics.REJECTIONS.labels(reason="api_body_too_large").inc()
        await _answer(send, 413, f"request body larger than {limit} bytes (http_max_body_bytes)")
