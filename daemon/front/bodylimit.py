"""Request body size limits for the front, as ASGI middleware.

Owns three rules. A body that stalls (no part of it for `idle_timeout_s`) is refused with 408; so
is one that arrives slower on average than `min_rate` bytes a second once `idle_timeout_s` of grace
has passed (a total deadline that grows with what arrived, as Apache's mod_reqtimeout MinRate, so a
client trickling a byte now and then cannot hold a connection for hours). And a request whose body
is over its limit is refused with 413, whether it announced
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
    idle_timeout_s=30, min_rate=100_000)` (min_rate 0: no total deadline)."""

    def __init__(self, app: ASGIApp, default: Limit, paths: Mapping[str, Limit] | None = None,
                 idle_timeout_s: float = 30.0, min_rate: float = 0.0):
        self.app = app
        self.default = default
        self.paths = dict(paths or {})
        self.idle_timeout_s = idle_timeout_s
        self.min_rate = min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope["path"], self.default)
        await self.app(scope, _limited(receive, limit, _declared_length(scope), self.idle_timeout_s, self.min_rate),
                       send)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _limited(receive: Receive, limit: Limit, declared_bytes: int, idle_timeout_s: float,
             min_rate: float) -> Receive:
    received_bytes, complete, started = 0, False, None

    async def receive_within_limit() -> Message:
        nonlocal received_bytes, complete, started
        if declared_bytes > limit.max_bytes:
            raise HTTPException(413, limit.message)
        if complete:  # after the body, receive() waits for a disconnect: no deadline
            return await receive()
        now = asyncio.get_running_loop().time()
        started = now if started is None else started
        left_s = started + idle_timeout_s + received_bytes / min_rate - now if min_rate else idle_timeout_s
        if left_s <= 0:
            raise HTTPException(408, _too_slow(received_bytes, now - started, min_rate))
        try:
            message = await asyncio.wait_for(receive(), min(idle_timeout_s, left_s))
        except asyncio.TimeoutError:
            if left_s < idle_timeout_s:
                waited_s = asyncio.get_running_loop().time() - started
                raise HTTPException(408, _too_slow(received_bytes, waited_s, min_rate)) from None
            raise HTTPException(408, f"no part of the request body arrived for {idle_timeout_s:g} s "
                                     "(serve.client_timeout_s)") from None
        if message["type"] == "http.request":
            complete = not message.get("more_body", False)
            received_bytes += len(message.get("body", b""))
            if received_bytes > limit.max_bytes:
                raise HTTPException(413, limit.message)
        return message

    return receive_within_limit


def _too_slow(received_bytes: int, seconds: float, min_rate: float) -> str:
    return (f"the request body arrived too slowly: {received_bytes:,} bytes in {seconds:.0f} s, under "
            f"{min_rate / 1000:g} kB/s (serve.min_body_kb_s)")
