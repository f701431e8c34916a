"""A real headless Chromium, driven over the DevTools protocol, for page tests.

Chromium comes from the Debian package (``apt-get install chromium``; ``.ci/run`` installs
it when missing). The browser runs with a private profile on a free port of 127.0.0.1;
tornado (installed with bokeh) speaks the DevTools WebSocket. ``text()`` reads the page's
text *including* shadow roots, where bokeh 3 renders its widgets.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

# Page text, descending into every open shadow root (bokeh 3 renders inside them).
_PAGE_TEXT = """
(() => {
  const parts = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
    }
    parts.push((root === document ? document.body.innerText : root.textContent) || '');
  };
  walk(document);
  return parts.join('\\n');
})()
"""

_CANVASES = """
(() => {
  let count = 0;
  const walk = (root) => {
    count += root.querySelectorAll('canvas').length;
    for (const el of root.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot);
  };
  walk(document);
  return count;
})()
"""


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser with one page; ``close()`` ends the process it started."""

    def __init__(self, profile: Path, width: int = 1200, height: int = 1400) -> None:
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("chromium is not installed (apt-get install -y chromium)")
        self.profile = profile
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        self._socket: WebSocketClientConnection = self.loop.run_until_complete(self._connect())

    async def _connect(self) -> WebSocketClientConnection:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not start")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.load(reply)
        page = next(t for t in targets if t["type"] == "page")
        return await websocket_connect(page["webSocketDebuggerUrl"], max_message_size=1 << 28)

    def send(self, method: str, **params: Any) -> dict:
        return self.loop.run_until_complete(self._send(method, params))

    async def _send(self, method: str, params: dict) -> dict:
        ident = next(self._ids)
        await self._socket.write_message(
            json.dumps({"id": ident, "method": method, "params": params})
        )
        while True:
            message = await self._socket.read_message()
            if message is None:
                raise RuntimeError("chromium closed the DevTools connection")
            reply = json.loads(message)
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, expect: str, timeout: float = 30.0) -> float:
        """Load ``url``; wait until its text contains ``expect`` and it drew a canvas.

        Returns the seconds from the navigation to that moment.
        """
        started = time.monotonic()
        self.send("Page.navigate", url=url)
        self.wait_for(expect, timeout)
        while not self.evaluate(_CANVASES):
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{url} drew no canvas within {timeout} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def wait_for(self, expect: str, timeout: float = 30.0) -> str:
        """The page's text once it contains ``expect``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if expect in text:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {expect!r}; it shows: {text[:2000]!r}")
            time.sleep(0.05)

    def text(self) -> str:
        return str(self.evaluate(_PAGE_TEXT) or "")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the window's height)."""
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        try:
            self._socket.close()
            self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where tests put screenshots: ``DASK_SERVERLESS_SCREENSHOTS`` (the docs) or tmp."""
    chosen = os.environ.get("DASK_SERVERLESS_SCREENSHOTS")
    return Path(chosen) if chosen else tmp_path
