"""The front: name mapping both ways, streaming, OpenAI-shaped errors, health, API key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from daemon.engine.router import Adapter, Router
from daemon.front.app import create_app


class FakeVLLM:
    """Answers like vLLM's OpenAI server and records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/completions")(self.chat)
        self.app.get("/v1/models")(self.models)

    async def chat(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        model = body["model"]
        if body.get("max_tokens", 0) > 4096:
            return JSONResponse({"error": {"message": "max_tokens too large", "type": "BadRequestError",
                                           "param": "max_tokens", "code": 400}}, status_code=400)
        if body.get("max_tokens") == -1:
            return PlainTextResponse("Internal Server Error", status_code=500)
        if body.get("max_tokens") == -2:  # what vLLM says of an adapter it does not hold (e.g. just restarted)
            return JSONResponse({"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                           "param": "model", "code": 404}}, status_code=404)
        if body.get("stream"):
            async def events():
                for word in ("Paris", " is", " it"):
                    chunk = {"id": "x", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": {"content": word}}]}
                    event = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                    if body.get("split"):  # the network may cut an event anywhere, the name too
                        cut = event.index(model) + 3
                        yield event[:cut]
                        yield event[cut:]
                    else:
                        yield event
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": "x", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}}]}

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "cld-base", "object": "model", "parent": None, "max_model_len": 4096}]}


@pytest.fixture
def fake() -> FakeVLLM:
    return FakeVLLM()


@pytest.fixture
def router(tmp_path: Path) -> Router:
    return Router("cld", "cld-base", tmp_path / "serving.json")


def front(router: Router, upstream: httpx.AsyncClient, healthy: bool = True, api_key: str = "",
          ready: bool = True, **extra: Any) -> httpx.AsyncClient:
    async def is_healthy() -> bool:
        return healthy

    async def status() -> dict[str, Any]:
        return {"model": {"served_name": "cld"}}

    app = create_app(router, upstream, healthy=is_healthy, status=status, api_key=api_key, ready=lambda: ready,
                     **extra)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")


def upstream_for(fake: FakeVLLM) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=fake.app), base_url="http://vllm")


CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}


async def test_stable_name_means_the_base_until_an_adapter_is_promoted(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", **CHAT})
        assert reply.status_code == 200 and reply.json()["model"] == "cld"
        assert fake.requests[-1]["model"] == "cld-base"

        router.switch(Adapter("v0003", "cld-v0003", Path("/adapters/v0003")))
        reply = await client.post("/v1/chat/completions", json={"model": "cld", **CHAT})
        assert fake.requests[-1]["model"] == "cld-v0003"
        assert reply.json()["model"] == "cld", "clients must never see adapter version names"

        reply = await client.post("/v1/completions", json={"model": "cld-base", "prompt": "Hi"})
        assert fake.requests[-1]["model"] == "cld-base" and reply.json()["model"] == "cld-base"


async def test_the_promoted_adapter_survives_a_restart(router: Router, tmp_path: Path) -> None:
    router.switch(Adapter("v0001", "cld-v0001", tmp_path / "adapters" / "v0001"))
    again = Router("cld", "cld-base", tmp_path / "serving.json")
    assert again.resolve("cld") == "cld-v0001"
    again.switch(None)
    assert Router("cld", "cld-base", tmp_path / "serving.json").resolve("cld") == "cld-base"


async def test_missing_model_field_means_the_stable_name(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 200 and reply.json()["model"] == "cld"


@pytest.mark.parametrize("split", [False, True])
async def test_streaming_renames_every_event_and_keeps_done(fake: FakeVLLM, router: Router, split: bool) -> None:
    router.switch(Adapter("v0002", "cld-v0002", Path("/a")))
    body = {"model": "cld", "stream": True, "split": split, **CHAT}
    async with front(router, upstream_for(fake)) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
            assert reply.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in reply.aiter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [event["model"] for event in events] == ["cld"] * 3
    assert "".join(event["choices"][0]["delta"]["content"] for event in events) == "Paris is it"
    assert "cld-v0002" not in "".join(lines)


async def test_unknown_model_is_an_openai_404_and_never_reaches_vllm(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "gpt-4", **CHAT})
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["code"] == "model_not_found" and "cld, cld-base" in error["message"]
    assert fake.requests == []


async def test_vllm_errors_reach_the_client_as_openai_errors(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", "max_tokens": 10**6, **CHAT})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"
        reply = await client.post("/v1/chat/completions", json={"model": "cld", "max_tokens": -1, **CHAT})
        assert reply.status_code == 500
        assert reply.json()["error"]["type"] == "upstream_error"


@pytest.mark.parametrize(("body", "fragment"), [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object")])
async def test_bad_request_bodies_are_400(fake: FakeVLLM, router: Router, body: bytes, fragment: str) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and fragment in reply.json()["error"]["message"]


async def test_model_server_down_is_a_503_not_a_traceback(router: Router) -> None:
    dead = httpx.AsyncClient(base_url="http://127.0.0.1:9", timeout=2)  # nothing listens on port 9
    async with front(router, dead) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", **CHAT})
    assert reply.status_code == 503
    assert reply.json()["error"]["type"] == "service_unavailable"


async def test_health_follows_the_model_server(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake), healthy=True) as client:
        assert (await client.get("/health")).status_code == 200
    async with front(router, upstream_for(fake), healthy=False) as client:
        assert (await client.get("/health")).status_code == 503


async def test_models_lists_only_the_public_names(fake: FakeVLLM, router: Router) -> None:
    router.switch(Adapter("v0001", "cld-v0001", Path("/a")))
    async with front(router, upstream_for(fake)) as client:
        data = (await client.get("/v1/models")).json()["data"]
    assert [model["id"] for model in data] == ["cld", "cld-base"]
    assert data[0]["max_model_len"] == 4096


async def test_api_key_guards_v1_and_api_but_not_health(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake), api_key="s3cret") as client:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/api/status")):
            reply = await client.request(method, path, json=CHAT)
            assert reply.status_code == 401, path
            assert reply.json()["error"]["code"] == "invalid_api_key"
            wrong = await client.request(method, path, json=CHAT, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
        good = await client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_requests_count_as_in_flight_until_their_answer_is_complete(fake: FakeVLLM, router: Router) -> None:
    async with front(router, upstream_for(fake)) as client:
        await client.post("/v1/chat/completions", json={"model": "cld", **CHAT})
        async with client.stream("POST", "/v1/chat/completions", json={"model": "cld", "stream": True, **CHAT}) as r:
            [line async for line in r.aiter_lines()]
        await client.post("/v1/chat/completions", json={"model": "gpt-4", **CHAT})
    assert router.in_flight == {}
    assert await router.drained("cld-base", timeout_s=0.1)
    router.begin("cld-v0001")
    assert not await router.drained("cld-v0001", timeout_s=0.1)


async def test_an_internal_name_never_leaks_in_an_error(fake: FakeVLLM, router: Router) -> None:
    router.switch(Adapter("v0003", "cld-v0003-1a2b3c", Path("/a")))
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", "max_tokens": -2, **CHAT})
    assert reply.status_code == 404 and "cld-v0003" not in reply.text
    assert reply.json()["error"]["message"] == "The model `cld` does not exist."


async def test_while_the_model_server_is_not_ready_requests_get_503_and_retry_after(fake: FakeVLLM,
                                                                                      router: Router) -> None:
    async with front(router, upstream_for(fake), ready=False) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", **CHAT})
    assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
    assert reply.json()["error"]["type"] == "service_unavailable" and fake.requests == []


@pytest.mark.parametrize("field, value", [("n", 1000), ("best_of", 9), ("max_tokens", 5000),
                                          ("max_completion_tokens", 10**9)])
async def test_one_request_cannot_ask_for_more_than_the_limits(fake: FakeVLLM, router: Router, field: str,
                                                               value: int) -> None:
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post("/v1/chat/completions", json={"model": "cld", field: value, **CHAT})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field
        assert "over this server's limit" in reply.json()["error"]["message"] and fake.requests == []
        within = await client.post("/v1/chat/completions", json={"model": "cld", "n": 8, "max_tokens": 4096, **CHAT})
        assert within.status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"n": "40", **CHAT}, "n"),  # vLLM reads "40" as 40: found by the second adversarial test
    ({"max_tokens": "5000", **CHAT}, "max_tokens"),
    ({"n": 2.5, **CHAT}, "n"),
    ({"n": True, **CHAT}, "n"),
    ({"prompt": ["Hi"] * 40}, "prompt"),  # 40 prompts are 40 completions
    ({"prompt": [[1, 2], [3, 4], [5, 6]], "n": 3}, "prompt"),  # 3 token-id prompts × n 3 = 9
])
async def test_a_request_cannot_pass_the_limits_in_another_form(fake: FakeVLLM, router: Router,
                                                                 body: dict, param: str) -> None:
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    async with front(router, upstream_for(fake)) as client:
        reply = await client.post(path, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
        assert fake.requests == []
        for within in ({"prompt": ["Hi"] * 8}, {"prompt": [1, 2, 3], "n": 8}, {"prompt": "Hi", "n": 8.0}):
            assert (await client.post("/v1/completions", json=within)).status_code == 200, within


async def test_a_client_that_goes_away_cancels_its_generation(router: Router) -> None:
    """A non-streaming request whose client disconnects stops waiting, and the upstream request
    is cancelled (its connection closed: vLLM then aborts the generation)."""
    import asyncio

    upstream_app = FastAPI()
    cancelled = asyncio.Event()

    @upstream_app.post("/v1/chat/completions")
    async def slow(request: Request) -> Any:
        try:
            await asyncio.sleep(30)  # generating 64 sequences...
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    upstream = httpx.AsyncClient(transport=httpx.ASGITransport(app=upstream_app), base_url="http://vllm")

    async def status() -> dict[str, Any]:
        return {}

    async def healthy() -> bool:
        return True

    app = create_app(router, upstream, healthy=healthy, status=status)
    body = json.dumps({"model": "cld", **CHAT}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    hangs_up_at = asyncio.get_running_loop().time() + 0.3  # the client waits a little, then hangs up

    async def receive() -> dict[str, Any]:  # as uvicorn's: blocks until there is something to say
        if messages:
            return messages.pop(0)
        if asyncio.get_running_loop().time() < hangs_up_at:
            await asyncio.sleep(hangs_up_at - asyncio.get_running_loop().time())
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"front")],
             "client": ("127.0.0.1", 1), "server": ("front", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    await asyncio.wait_for(cancelled.wait(), timeout=5)
    assert sent[0]["status"] == 499 and router.in_flight == {}
