"""API keys: who may use /v1, /api, /metrics (a bearer token) and /status (the key as a bearer
token, or as the password of HTTP Basic so that a browser asks for it).

Owns the checks, each in constant time. Knows nothing of where the key comes from
(`[security]` in config) or what the routes do. With no key set, every check passes (the front
then binds loopback only; config refuses a public bind without a key).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Optional

from fastapi import Depends, Request
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from daemon.front.errors import ProxyError, openai_error

PAGE_CHALLENGE = {"WWW-Authenticate": 'Basic realm="cld", charset="UTF-8"'}


def page_key_checker(api_key: str) -> Callable[..., Awaitable[None]]:
    """The status page's guard: the API key as a bearer token, or as the password of HTTP Basic
    (any user name), so that a browser asks for it (nothing when no key is set)."""

    async def check(request: Request, basic: Optional[HTTPBasicCredentials] = Depends(HTTPBasic(auto_error=False))
                    ) -> None:
        if not api_key or _has_bearer(request, api_key):
            return
        if basic is not None and secrets.compare_digest(basic.password.encode(), api_key.encode()):
            return
        raise ProxyError(PlainTextResponse("the status page needs the API key (as the password)", 401,
                                           headers=PAGE_CHALLENGE))

    return check


def key_checker(api_key: str) -> Callable[[Request], Awaitable[None]]:
    """The dependency that guards /v1 and /api: `Authorization: Bearer <api_key>` (nothing when no key is set)."""

    async def check(request: Request) -> None:
        if not api_key or _has_bearer(request, api_key):
            return
        response = openai_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                "authentication_error", "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        raise ProxyError(response)

    return check


def _has_bearer(request: Request, api_key: str) -> bool:
    """`Authorization: Bearer <api_key>`, compared in constant time."""
    given = request.headers.get("authorization", "").encode()
    return secrets.compare_digest(given, f"Bearer {api_key}".encode())
