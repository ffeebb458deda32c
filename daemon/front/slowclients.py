"""Slow clients: a connection must send its request headers within `serve.client_timeout_s`
(counted from when it opens, or from the first byte of each next request on a kept-alive
connection), else it is closed. uvicorn has no such limit of its own, so 25 connections that
send a header byte now and then would be held open forever (slowloris). Bodies have the same
limit between their parts (`daemon.front.bodylimit`).

Owns the uvicorn protocol class that does this. Knows nothing of routes.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class HeaderDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request's headers."""

    header_timeout_s = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers in %.0f s (serve.client_timeout_s)",
                     self.header_timeout_s)
            self.transport.close()


def protocol(header_timeout_s: float) -> type[HeaderDeadline]:
    """The protocol class for `uvicorn.Config(http=...)` with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadline,), {"header_timeout_s": header_timeout_s})
