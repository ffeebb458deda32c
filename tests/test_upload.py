"""POST /api/documents: an upload lands in the inbox whole, under a plain name; bad requests get
a clear OpenAI-shaped 4xx and leave nothing behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from daemon.engine.router import Router
from daemon.front.app import create_app
from daemon.ingestion.inbox import Uploads

LIMIT_BYTES = 1000


def client(tmp_path: Path, api_key: str = "") -> httpx.AsyncClient:
    async def healthy() -> bool:
        return True

    async def status() -> dict[str, Any]:
        return {}

    app = create_app(Router("cld", "cld-base", tmp_path / "serving.json"), httpx.AsyncClient(), healthy=healthy,
                     status=status, api_key=api_key, uploads=Uploads(tmp_path / "inbox", LIMIT_BYTES))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://front")


def inbox_files(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "inbox").iterdir()) if (tmp_path / "inbox").exists() else []


def error_of(reply: httpx.Response) -> dict[str, Any]:
    return reply.json()["error"]


async def test_an_upload_is_queued_in_the_inbox(tmp_path: Path) -> None:
    async with client(tmp_path) as front:
        first = await front.post("/api/documents", files={"file": ("../../notes.md", b"# Notes\n\nZorblat.")})
        second = await front.post("/api/documents", files={"file": ("notes.md", b"again")})
    assert first.status_code == 202
    assert first.json() == {"object": "document.upload", "name": "notes.md", "bytes": 17, "status": "queued"}
    assert second.json()["name"] == "notes.1.md"
    assert (tmp_path / "inbox/notes.md").read_bytes() == b"# Notes\n\nZorblat."
    assert inbox_files(tmp_path) == ["notes.1.md", "notes.md"]


@pytest.mark.parametrize("request_args, status, words", [
    ({"files": {"file": ("big.txt", b"x" * (LIMIT_BYTES + 1))}}, 413, "upload limit"),
    ({"files": {"file": ("big.txt", b"x" * (LIMIT_BYTES + 70_000))}}, 413, "upload limit"),  # refused by its length
    ({"files": {"file": ("slides.pptx", b"PK")}}, 415, "unsupported type: '.pptx'"),
    ({"files": {"file": ("..", b"text")}}, 400, "no usable name"),
    ({"files": [("file", ("a.txt", b"a")), ("file", ("b.txt", b"b"))]}, 400, "exactly one"),
    ({"data": {"text": "not a file"}}, 400, "exactly one"),
    ({"json": {"file": "notes.md"}}, 400, "exactly one"),
])
async def test_bad_uploads_are_refused_clearly_and_leave_nothing(tmp_path: Path, request_args: dict, status: int,
                                                                 words: str) -> None:
    async with client(tmp_path) as front:
        reply = await front.post("/api/documents", **request_args)
    assert reply.status_code == status
    assert words in error_of(reply)["message"] and error_of(reply)["type"] == "invalid_request_error"
    assert inbox_files(tmp_path) == []


async def test_uploads_need_the_api_key_when_one_is_set(tmp_path: Path) -> None:
    async with client(tmp_path, api_key="sekrit") as front:
        refused = await front.post("/api/documents", files={"file": ("a.txt", b"a")})
        taken = await front.post("/api/documents", files={"file": ("a.txt", b"a")},
                                 headers={"Authorization": "Bearer sekrit"})
    assert (refused.status_code, taken.status_code) == (401, 202)
    assert inbox_files(tmp_path) == ["a.txt"]
