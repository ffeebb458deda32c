"""Request body size limits for the front, as ASGI middleware.

Owns two rules. A body that stalls (no part of it for `idle_timeout_s`) is refused with 408. And a
request whose body is over its limit is refused with 413, whether it announced
its length (refused before a byte is read) or streams it chunked (refused as soon as the limit is
passed, so it is never held whole in memory or on disk). The refusal is an HTTPException raised
where the app reads the body, so the app's own error handler shapes the answer. Knows nothing of
the routes beyond the path → limit table it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class Limit:
    max_bytes: int
    message: str  # what the 413 answer says (name the setting that raises the limit)


class BodyLimit:
    """`app.add_middleware(BodyLimit, default=Limit(...), paths={"/api/documents": Limit(...)},
    idle_timeout_s=30)`."""

    def __init__(self, app: ASGIApp, default: Limit, paths: Mapping[str, Limit] | None = None,
                 idle_timeout_s: float = 30.0):
        self.app = app
        self.default = default
        self.paths = dict(paths or {})
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.default)
        await self.app(scope, _limited(receive, limit, _declared_length(scope), self.idle_timeout_s), send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _limited(receive: Receive, limit: Limit, declared_bytes: int, idle_timeout_s: float) -> Receive:
    received_bytes, complete = 0, False

    async def receive_within_limit() -> Message:
        nonlocal received_bytes, complete
        if declared_bytes > limit.max_bytes:
            raise HTTPException(413, limit.message)
        if complete:  # after the body, receive() waits for a disconnect: no deadline
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), idle_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"no part of the request body arrived for {idle_timeout_s:g} s "
                                     "(serve.client_timeout_s)") from None
        if message["type"] == "http.request":
            complete = not message.get("more_body", False)
            received_bytes += len(message.get("body", b""))
            if received_bytes > limit.max_bytes:
                raise HTTPException(413, limit.message)
        return message

    return receive_within_limit
