"""The front HTTP server: the OpenAI-compatible API clients use, plus health, status (JSON and
the HTML page of `daemon.observe.statuspage`) and Prometheus metrics (`daemon.observe.metrics`).

Owns HTTP only: `/v1/*` requests are proxied to vLLM with the public model name (`cld`,
`cld-base`) swapped for the served one and back again, so clients never see adapter versions;
errors are always OpenAI-shaped JSON. Knows nothing of how the daemon decides what to serve
(`daemon.engine.router.Router` tells it) or how status is gathered (a callable gives it).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Optional

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from daemon.engine.router import Router
from daemon.front.auth import key_checker, page_key_checker
from daemon.front.bodylimit import BodyLimit, Limit
from daemon.front.errors import ProxyError, openai_error
from daemon.ingestion.inbox import HandInError, TooLarge, Uploads
from daemon.ingestion.readers import Unreadable, UnsupportedType
from daemon.layout import BASE_VERSION, is_version
from daemon.observe import statuspage
from daemon.observe.metrics import OTHER_MODEL, Metrics
from daemon.recall import frame
from daemon.recall.recaller import Recalled, Recaller

log = logging.getLogger(__name__)

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
HealthSource = Callable[[], Awaitable[bool]]
PROXIED = ("/v1/completions", "/v1/chat/completions")
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
MAX_BODY_BYTES = 32_000_000  # serve.max_request_mb's default
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # multipart headers around an uploaded file


class Unavailable(RuntimeError):
    """An admin action the model server cannot do now: before it is ready, or a version it could
    not start serving (answered with 503 and the reason)."""


@dataclass(frozen=True)
class Admin:
    """The daemon's admin actions behind /api (the front only does HTTP)."""

    cycle: Callable[[], Awaitable[dict[str, Any]]]
    adapters: Callable[[], Awaitable[list[dict[str, Any]]]]
    rollback: Callable[[Optional[str]], Awaitable[dict[str, Any]]]
    retry: Callable[[Optional[list[int]]], Awaitable[dict[str, Any]]]


class RetryRequest(BaseModel):
    documents: Optional[list[int]] = Field(None, description="Ids of set-aside documents; null = all of them.")


class RollbackRequest(BaseModel):
    version: Optional[str] = Field(None, description='Adapter version such as "v0003"; "base" or null = the base model.')


def create_app(
    router: Router,
    upstream: httpx.AsyncClient,
    *,
    healthy: HealthSource,
    status: StatusSource,
    unhealthy_reason: Optional[Callable[[], Optional[str]]] = None,
    api_key: str = "",
    admin_key: str = "",
    ready: Callable[[], bool] = lambda: True,
    admin: Optional[Admin] = None,
    uploads: Optional[Uploads] = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    client_timeout_s: float = 30.0,
    min_body_rate: float = 0.0,
    limits: Optional[GenerationLimits] = None,
    metrics: Optional[Metrics] = None,
    recaller: Optional[Recaller] = None,
    chat_stop: Optional[Callable[[], list[str]]] = None,
) -> FastAPI:
    """Build the front app. `upstream` is an httpx client whose base_url is the vLLM server (the
    router's `endpoints` name the instances of merged-weight versions); `recaller` puts passages of
    the documents cld holds in front of requests to the stable name (daemon.recall); `chat_stop`
    says where a chat answer ends when the client does not (a pretrained base: daemon.model.answer_stop)."""
    # No /docs, /redoc or /openapi.json: they would describe the API to anyone, key or not.
    app = FastAPI(title="cld", openapi_url=None, docs_url=None, redoc_url=None)
    require_key = key_checker(api_key)
    require_admin = key_checker(admin_key) if admin_key else require_key
    _limit_bodies(app, max_body_bytes, uploads, client_timeout_s, min_body_rate)
    metrics = metrics or Metrics()
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(ProxyError)
    async def _proxy_error(request: Request, error: ProxyError) -> JSONResponse:
        return error.response

    @app.exception_handler(OSError)
    async def _os_error(request: Request, error: OSError) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return openai_error(507, "cld's disk is full: nothing was stored; free some space and send it again",
                                "insufficient_storage")
        return openai_error(500, f"cld could not complete the request: {error.strerror or error}", "internal_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return openai_error(500, f"cld failed: {type(error).__name__}", "internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        response = openai_error(error.status_code, str(error.detail), "invalid_request_error")
        response.headers.update(error.headers or {})  # e.g. the Basic challenge for a garbled Authorization
        return response

    @app.get("/health")
    async def health() -> Response:
        if await healthy():
            return JSONResponse({"status": "ok"})
        why = unhealthy_reason() if unhealthy_reason is not None else None
        return openai_error(503, why or "the model server is not ready", "service_unavailable")

    @app.get("/api/status", dependencies=[Depends(require_key)])
    async def api_status() -> dict[str, Any]:
        return await status()

    _observe_routes(app, metrics, status, require_key, page_key_checker(api_key))
    if admin is not None:
        _admin_routes(app, admin, require_key, require_admin)
    if uploads is not None:
        _document_routes(app, uploads, require_admin)

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await _public_models(router, upstream)}

    async def proxy(request: Request) -> Response:
        payload = await _read_payload(request)
        wants_recall = _recall_asked(payload)
        public = payload.get("model") or router.model_name
        served = router.resolve(public)
        request.scope[MODEL_LABEL] = public if served else OTHER_MODEL  # for RequestMetrics
        if served is None:
            valid = ", ".join(router.public_names)
            raise ProxyError(openai_error(404, f"The model `{public}` does not exist. Valid: {valid}.",
                                          "NotFoundError", "model_not_found", "model"))
        (limits or GenerationLimits()).check(payload)
        if not ready():  # e.g. vLLM restarting: the promoted adapter is not loaded yet
            raise ProxyError(openai_error(503, "the model server is starting; try again shortly",
                                          "service_unavailable", headers={"Retry-After": "5"}))
        recalled = Recalled(payload)
        if recaller is not None and wants_recall and public == router.model_name:
            recalled = await recaller.apply(request.url.path, payload)
            payload = recalled.payload
        payload["model"] = served
        if chat_stop is not None and request.url.path == frame.CHAT and "stop" not in payload and (stop := chat_stop()):
            payload["stop"] = stop
        router.begin(served)  # until the answer is complete, `served` must stay loaded
        try:
            # a merged-weight version has a vLLM instance of its own (daemon.engine.merged)
            reply = await _send_unless_gone(request, router.endpoints.get(served, upstream), payload)
        except (ProxyError, ClientGone):
            router.end(served)
            raise
        said = {frame.HEADER: frame.header(recalled.hits)} if recalled.hits else {}
        if payload.get("stream") and reply.status_code == 200:
            return StreamingResponse(
                _rename_stream(reply, served, public, router),
                media_type=reply.headers.get("content-type", "text/event-stream"), headers=said,
            )
        try:
            content = await reply.aread()
        finally:
            await _close(reply, router, served)
        response = _renamed_response(reply, content, served, public)
        if recalled.hits and reply.status_code == 200 and (response.media_type or "").startswith("application/json"):
            response = Response(frame.with_sources(response.body, frame.sources(recalled.hits)),
                                media_type=response.media_type, headers=said)
        return response

    for path in PROXIED:
        app.add_api_route(path, proxy, methods=["POST"], dependencies=[Depends(require_key)],
                          include_in_schema=True, name=path.rsplit("/", 1)[-1])
    return app


@dataclass(frozen=True)
class GenerationLimits:
    """What one request may ask of the model (serve.max_n, serve.max_tokens): a single request
    must not hold the model server for everyone else."""

    max_n: int = 8
    max_tokens: int = 4096

    def check(self, payload: dict[str, Any]) -> None:
        """400 for a limited field that is not a whole number (vLLM would read "40" as 40) or is over
        its limit, and for more choices (prompts × n) than serve.max_n."""
        for field, limit, setting in (("n", self.max_n, "serve.max_n"), ("best_of", self.max_n, "serve.max_n"),
                                      ("max_tokens", self.max_tokens, "serve.max_tokens"),
                                      ("max_completion_tokens", self.max_tokens, "serve.max_tokens")):
            value = payload.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise ProxyError(openai_error(400, f"{field} must be a whole number (got {json.dumps(value)[:40]})",
                                              "invalid_request_error", "invalid_type", field))
            if value > limit:
                raise ProxyError(openai_error(400, f"{field} = {value} is over this server's limit of {limit} "
                                                   f"({setting})", "invalid_request_error", "over_limit", field))
        prompts = _prompt_count(payload.get("prompt"))
        choices = prompts * int(payload.get("n") or 1)
        if choices > self.max_n:
            raise ProxyError(openai_error(400, f"{prompts} prompts × n = {choices} completions is over this server's "
                                               f"limit of {self.max_n} (serve.max_n)", "invalid_request_error",
                                          "over_limit", "prompt"))


def _prompt_count(prompt: Any) -> int:
    """How many prompts a completions request holds: a list of texts or of token-id lists is several,
    a text or one list of token ids is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(item, (str, list)) for item in prompt):
        return len(prompt)
    return 1


class ClientGone(Exception):
    """The client went away before its answer was ready; the upstream request was cancelled."""


async def _send_unless_gone(request: Request, upstream: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
    """Send upstream, but cancel (closing the connection, which makes vLLM abort the generation)
    when the client disconnects first: nobody would read the answer. A streamed answer's
    disconnect is handled by the stream itself."""
    sending = asyncio.ensure_future(_send(upstream, request.url.path, payload))
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if not sending.done():
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        log.info("client went away: cancelled its request to the model server")
        raise ClientGone()
    return sending.result()


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _send(upstream: httpx.AsyncClient, path: str, payload: dict[str, Any]) -> httpx.Response:
    try:
        return await upstream.send(upstream.build_request("POST", path, json=payload), stream=True)
    except httpx.TimeoutException:
        raise ProxyError(openai_error(504, "the model server did not answer in time", "timeout")) from None
    except httpx.TransportError as error:
        log.warning("model server unreachable: %s", error)
        raise ProxyError(openai_error(503, "the model server is not available; try again shortly",
                                      "service_unavailable")) from None


async def _close(reply: httpx.Response, router: Router, served: str) -> None:
    try:
        await reply.aclose()
    finally:
        router.end(served)


def _admin_routes(app: FastAPI, admin: Admin, require_key: Callable[[Request], Awaitable[None]],
                  require_admin: Callable[[Request], Awaitable[None]]) -> None:
    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, error: Unavailable) -> JSONResponse:
        return openai_error(503, str(error), "service_unavailable")

    @app.post("/api/cycles", status_code=202, dependencies=[Depends(require_admin)])
    async def start_cycle() -> dict[str, Any]:
        """Start a learning cycle now (or report the one already running)."""
        return await admin.cycle()

    @app.post("/api/documents/retry", dependencies=[Depends(require_admin)])
    async def retry_documents(body: RetryRequest) -> dict[str, Any]:
        """Put documents set aside after refused cycles (schedule.max_attempts) back into the next cycle."""
        return await admin.retry(body.documents)

    @app.get("/api/adapters", dependencies=[Depends(require_key)])
    async def list_adapters() -> dict[str, Any]:
        return {"adapters": await admin.adapters()}

    @app.post("/api/rollback", dependencies=[Depends(require_admin)])
    async def rollback(body: RollbackRequest) -> dict[str, Any]:
        """Serve an earlier adapter version (or the base model) under the stable name."""
        version = None if body.version in (None, BASE_VERSION) else body.version
        if version is not None and not is_version(version):
            raise ProxyError(openai_error(400, f"version must be an adapter version such as v0003, or "
                                               f"'{BASE_VERSION}'", "invalid_request_error", "invalid_version",
                                          "version"))
        try:
            return await admin.rollback(version)
        except ValueError as error:
            raise ProxyError(openai_error(404, str(error), "invalid_request_error", "adapter_not_found",
                                          "version")) from None


def _document_routes(app: FastAPI, uploads: Uploads, require_key: Callable[[Request], Awaitable[None]]) -> None:
    @app.post("/api/documents", status_code=202, dependencies=[Depends(require_key)])
    async def upload_document(request: Request) -> dict[str, Any]:
        """Hand in one document as multipart/form-data field `file` (`curl -F file=@notes.md`). It is
        ingested like a file dropped in the inbox; 202 = queued, /api/status counts the outcome."""
        async with request.form(max_files=2, max_fields=8) as form:
            files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
            if len(files) != 1:
                raise ProxyError(openai_error(400, "send exactly one document, as multipart/form-data field 'file'",
                                              "invalid_request_error", param="file"))
            try:
                handed = await run_in_threadpool(uploads.hand_in, files[0].filename or "", files[0].file)
            except (HandInError, Unreadable) as error:
                raise _upload_error(error) from None
        return {"object": "document.upload", "name": handed.name, "bytes": handed.bytes, "status": "queued"}


def _upload_error(error: Exception) -> ProxyError:
    status = 413 if isinstance(error, TooLarge) else 415 if isinstance(error, UnsupportedType) else 400
    return ProxyError(openai_error(status, str(error), "invalid_request_error", param="file"))


def _limit_bodies(app: FastAPI, max_body_bytes: int, uploads: Optional[Uploads], idle_timeout_s: float,
                  min_body_rate: float) -> None:
    """413 for bodies over the limit, announced or chunked (an upload may be a file of
    ingest.max_file_mb plus its multipart headers); 408 for a body that stalls or trickles."""
    paths = {}
    if uploads is not None:
        paths["/api/documents"] = Limit(uploads.max_bytes + UPLOAD_OVERHEAD_BYTES, str(uploads.too_large()))
    default = Limit(max_body_bytes, f"request body over {max_body_bytes / 1e6:g} MB (serve.max_request_mb)")
    app.add_middleware(BodyLimit, default=default, paths=paths, idle_timeout_s=idle_timeout_s, min_rate=min_body_rate)


# ---- observability: /metrics, /status and request metrics (daemon.observe.metrics, daemon.observe.statuspage) ------

MODEL_LABEL = "cld.model"  # the ASGI scope key under which the proxy names a request's public model


def _observe_routes(app: FastAPI, metrics: Metrics, status: StatusSource,
                    require_key: Callable[..., Awaitable[None]], page_key: Callable[..., Awaitable[None]]) -> None:
    @app.get("/metrics", dependencies=[Depends(require_key)], include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        body, content_type = await run_in_threadpool(metrics.expose, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/status", dependencies=[Depends(page_key)], response_class=HTMLResponse, include_in_schema=False)
    async def status_page() -> HTMLResponse:
        return HTMLResponse(await run_in_threadpool(statuspage.render, await status()))


class RequestMetrics:
    """ASGI middleware: counts and times the inference requests (`PROXIED`), by the public model
    name the proxy puts in the scope and the status code sent; the time runs to the answer's end."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] not in PROXIED:
            return await self.app(scope, receive, send)
        started_s, code = time.perf_counter(), 500

        async def send_noting_status(message: dict[str, Any]) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            self.metrics.request_done(scope.get(MODEL_LABEL, OTHER_MODEL), code, started_s)


async def _read_payload(request: Request) -> dict[str, Any]:
    body = await request.body()  # BodyLimit refuses one over serve.max_request_mb
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProxyError(openai_error(400, f"request body is not valid JSON: {error}", "invalid_request_error")) from None
    if not isinstance(payload, dict):
        raise ProxyError(openai_error(400, "request body must be a JSON object", "invalid_request_error"))
    return payload


def _recall_asked(payload: dict[str, Any]) -> bool:
    """Whether the request lets recall put documents in front of it (the extra body field
    `recall`, true unless false); the field never reaches the model server."""
    asked = payload.pop("recall", True)
    if not isinstance(asked, bool):
        raise ProxyError(openai_error(400, "recall must be true or false (false: answer from the model's weights "
                                           "alone)", "invalid_request_error", param="recall"))
    return asked


async def _rename_stream(reply: httpx.Response, served: str, public: str, router: Router) -> AsyncIterator[bytes]:
    """Relay server-sent events with the served model name replaced, whole events at a time (a
    byte replace per event: the proxy must cost vLLM as little CPU as possible). The request
    counts as in flight until the stream ends or the client goes away."""
    renames = _renames(served, public)
    pending = b""
    try:
        async for chunk in reply.aiter_bytes():
            pending += chunk
            cut = pending.rfind(b"\n\n") + 2
            if cut > 1:
                events, pending = pending[:cut], pending[cut:]
                yield _rename(events, renames)
        if pending:
            yield _rename(pending, renames)
    finally:
        await _close(reply, router, served)


def _renames(served: str, public: str) -> list[tuple[bytes, bytes]]:
    """The `"model": "<served>"` fields to rewrite, as vLLM (compact) or others (spaced) write them."""
    return [(f'"model":{sep}{json.dumps(served)}'.encode(), f'"model":{sep}{json.dumps(public)}'.encode())
            for sep in ("", " ")]


def _rename(data: bytes, renames: list[tuple[bytes, bytes]]) -> bytes:
    for old, new in renames:
        data = data.replace(old, new)
    return data


def _renamed_response(reply: httpx.Response, content: bytes, served: str, public: str) -> Response:
    media_type = reply.headers.get("content-type", "application/json")
    if reply.status_code == 200 and media_type.startswith("application/json"):
        return Response(_rename(content, _renames(served, public)), media_type=media_type)
    if reply.status_code >= 400:  # e.g. "The model `cld-v0003-1a2b3c` does not exist": never leak a served name
        content = content.replace(served.encode(), public.encode())
        if not media_type.startswith("application/json"):
            text = content.decode(errors="replace")[:500]
            return openai_error(reply.status_code, f"model server error: {text}", "upstream_error")
    return Response(content, status_code=reply.status_code, media_type=media_type)


async def _public_models(router: Router, upstream: httpx.AsyncClient) -> list[dict[str, Any]]:
    extra: dict[str, Any] = {}
    try:
        reply = await upstream.get("/v1/models", timeout=2)
        base = next(m for m in reply.json()["data"] if m["id"] == router.base_served_name)
        extra = {"max_model_len": base["max_model_len"]} if "max_model_len" in base else {}
    except (httpx.HTTPError, ValueError, KeyError, StopIteration):
        pass
    created = int(time.time())
    return [
        {"id": name, "object": "model", "created": created, "owned_by": "cld", **extra}
        for name in router.public_names
    ]
