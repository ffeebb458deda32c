"""The /status page: served by the front from a state directory with a history, rendered by a real
headless Chromium (Debian's `chromium`, which `make test` installs), checked as a screenshot and
as a DOM; its strings escaped; the API key asked for as a browser can give it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lxml.html
import pytest
import uvicorn
from PIL import Image

from daemon.engine.router import Router
from daemon.front.app import create_app
from daemon.observe import status, statuspage
from tests.conftest import free_port
from tests.status_helpers import HOSTILE, SERVING, VERSIONS, settings_for, write_history

WINDOW = (1280, 1800)
CHROMIUM_TIMEOUT_S = 120
PLOT_COLOURS = {series.probe: series.colour for _, _, all_series in statuspage.PLOTS for series in all_series}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Any:
    settings = settings_for(tmp_path_factory.mktemp("history"))
    write_history(settings)
    return settings


def app_for(settings: Any, api_key: str = "") -> Any:
    async def healthy() -> bool:
        return True

    async def current() -> dict[str, Any]:
        return status.collect(settings, daemon={"running": True, "pid": 4242, "url": "http://127.0.0.1:8000",
                                                "phase": "serving", "vllm": "ready", "vllm_restarts": 0})

    router = Router(settings.serve.model_name, settings.serve.base_name, settings.state.dir / "serving.json")
    return create_app(router, httpx.AsyncClient(base_url="http://127.0.0.1:9"), healthy=healthy, status=current,
                      api_key=api_key)


@contextlib.contextmanager
def listening(app: Any) -> Iterator[str]:
    """`app` served on a free port by uvicorn in a thread (so a browser can load it); its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off",
                                           loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "the front did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def served(history: Any) -> Iterator[str]:
    with listening(app_for(history)) as url:
        yield url


def chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium is not installed: `make test` installs it (apt-get install chromium)"
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S, cwd=tmp_path)


def test_the_page_renders_in_chromium_with_its_plots(served: str, tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    result = chromium(f"{served}/status", tmp_path, f"--screenshot={shot}")
    assert shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 500, "the page looks blank"
    for probe, colour in PLOT_COLOURS.items():
        drawn = _pixels_near(image, colour)
        assert drawn > 300, f"the {probe} line ({colour}) is missing from the screenshot ({drawn} pixels)"


def test_the_rendered_dom_has_one_point_per_version_reasons_and_no_live_markup(served: str, tmp_path: Path) -> None:
    result = chromium(f"{served}/status", tmp_path, "--dump-dom")
    assert "<svg" in result.stdout, result.stderr[-2000:]
    dom = lxml.html.fromstring(result.stdout)
    assert "".join(dom.xpath("//*[@id='serving']//text()")) == f"cld = {SERVING}"
    assert len(dom.xpath("//figure//svg")) == 2
    for probe in PLOT_COLOURS:
        points = dom.xpath(f"//g[@id='series-{probe}']//use")
        assert len(points) == len(VERSIONS), f"{probe}: {len(points)} points for {len(VERSIONS)} versions"
        assert dom.xpath(f"//g[@id='limit-{probe}']"), f"{probe}: its threshold is not drawn"
    reasons = dom.xpath("//table[@id='cycles']//li/text()")
    assert "forgetting vs base +16.0% > +2.0%" in reasons
    failed = dom.xpath("//table[@id='cycles']//li[@class='fail']/text()")
    assert {"forgetting vs base +16.0% > +2.0%", "NLL drop on new documents 4.0% < 10.0%"} <= set(failed)
    assert not [r for r in failed if "≤" in r or "≥" in r], "a passed check is shown as failed"
    # The hostile strings arrived as text: no element or handler of theirs exists in the page.
    assert not dom.xpath("//body//script") and not dom.xpath("//img")
    assert any(HOSTILE in text for text in dom.xpath("//table[@id='cycles']//text()"))
    assert [r.text for r in dom.xpath("//table[@id='adapters']//tr/td[1]")][:4] == ["v0006", "v0005", "v0004",
                                                                                   "v0003"]


def test_the_page_escapes_every_string(history: Any) -> None:
    page = statuspage.render(status.collect(history))
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&#34;owned&#34;)&lt;/script&gt;" in page
    assert '<meta http-equiv="refresh"' in page


def test_a_state_without_versions_renders_without_plots(tmp_path: Path) -> None:
    page = statuspage.render(status.collect(settings_for(tmp_path)))
    assert "<svg" not in page and "No version has probe results yet." in page and "no cycle yet" in page


async def test_with_an_api_key_the_page_asks_a_browser_for_it(history: Any) -> None:
    transport = httpx.ASGITransport(app=app_for(history, api_key="s3cret"))
    async with httpx.AsyncClient(transport=transport, base_url="http://front") as client:
        refused = await client.get("/status")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        wrong = await client.get("/status", auth=("admin", "nope"))
        assert wrong.status_code == 401
        assert (await client.get("/status", auth=("anyone", "s3cret"))).status_code == 200
        bearer = await client.get("/status", headers={"Authorization": "Bearer s3cret"})
        assert bearer.status_code == 200 and "<svg" in bearer.text
        garbled = await client.get("/status", headers={"Authorization": "Basic %%%"})
        assert garbled.status_code == 401 and garbled.headers["www-authenticate"].startswith("Basic")


def test_a_browser_logs_in_with_the_key_as_password(history: Any, tmp_path: Path) -> None:
    with listening(app_for(history, api_key="s3cret")) as url:
        page = chromium(url.replace("http://", "http://cld:s3cret@") + "/status", tmp_path, "--dump-dom").stdout
        assert f"cld = {SERVING}" in page
        refused = chromium(f"{url}/status", tmp_path, "--dump-dom").stdout
        assert "<svg" not in refused and f"cld = {SERVING}" not in refused


def _pixels_near(image: Image.Image, colour: str, tolerance: int = 40) -> int:
    target = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(count for count, rgb in image.getcolors(maxcolors=1 << 20) or []
               if all(abs(a - b) <= tolerance for a, b in zip(rgb, target)))


def test_a_running_daemon_shows_what_recall_did(tmp_path: Path) -> None:
    live = {"running": True, "pid": 1, "url": "http://127.0.0.1:8000", "phase": "serving",
            "recall": {"enabled": True, "documents": 2, "passages": 7, "mean_ms": 12.5,
                       "requests": {"recalled": 3, "passed": 1, "not_asked": 0, "off": 0, "failed": 0}}}
    page = statuspage.render(status.collect(settings_for(tmp_path), daemon=live))
    assert 'id="recall"' in page and "7 passages of 2 documents · 3 of 4 requests recalled (12.5 ms each)" in page
    assert 'id="recall"' not in statuspage.render(status.collect(settings_for(tmp_path)))
