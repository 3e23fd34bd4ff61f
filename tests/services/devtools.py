"""Drive a page in headless chromium over the DevTools protocol (loopback only), so a test can
click through the report as a reader does and read back what the page shows."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import aiohttp
import httpx

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1200,2000", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
LOADED = "location.protocol + ':' + document.readyState + ':' + String(document.body.dataset.thumbnails !== undefined)"


def run_in_page(page: Path, profile: Path, script: str, timeout: float = 90.0):
    """Open `page`, wait until it has loaded (its load handler ran), evaluate `script` (an
    expression; a promise is awaited) and return its value."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed: .ci/run installs Debian's chromium (apt-get install chromium)"
    browser = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", page.resolve().as_uri()],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _port(profile / "DevToolsActivePort", time.monotonic() + timeout)
        return asyncio.run(asyncio.wait_for(_evaluate(port, script), timeout))
    finally:
        browser.kill()
        browser.wait()


def _port(announced: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        if announced.is_file() and announced.read_text().strip():
            return int(announced.read_text().split()[0])
        time.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


async def _evaluate(port: int, script: str):
    while True:
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        if pages and pages[0]["url"].startswith("file:"):
            break
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session, \
            session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as socket:
        calls = iter(range(1, 1_000_000))

        async def evaluate(expression: str):
            call = next(calls)
            await socket.send_json({"id": call, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "awaitPromise": True, "returnByValue": True}})
            async for message in socket:
                answer = message.json()
                if answer.get("id") == call:
                    return answer.get("result", {})

        while (await evaluate(LOADED)).get("result", {}).get("value") != "file::complete:true":
            await asyncio.sleep(0.1)
        result = await evaluate(script)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")
