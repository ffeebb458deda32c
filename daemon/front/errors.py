"""Errors as clients see them: OpenAI-shaped JSON (`{"error": {"message", "type", "param",
"code"}}`), raised anywhere in a request as ProxyError and answered as they are.

Owns the error shape. Knows nothing of routes.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response


def openai_error(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
    return JSONResponse(body, status_code=status, headers=headers)


class ProxyError(Exception):
    """Answer the request with `response` (an OpenAI-shaped error, or a challenge)."""

    def __init__(self, response: Response):
        self.response = response
