"""Headless Chromium for the tests, driven through chromedriver with the W3C WebDriver
protocol (https://www.w3.org/TR/webdriver2/) spoken over urllib: no client library.

Debian's ``chromium`` and ``chromium-driver`` (``tools/install-browser`` installs them).
Chromium starts with the flags a closed network needs (no background networking, component
updates, sync, QUIC), a fresh profile in a temp dir, every name resolving to nothing, and an
HTTP proxy that is a local listening socket nobody answers: any request the page made would
arrive there, so :meth:`Browser.proxy_connections` counting none proves none was made.

Usage::

    with Browser() as browser:
        browser.get(Path("page.html").as_uri())
        browser.execute("return document.title")
        browser.click("#filter-unexpected")
        browser.screenshot(Path("build/artifacts/page.png"))
        browser.console()                    # the browser log: [{"level": ..., "message": ...}]
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
START_TIMEOUT = 30.0
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier


def missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None when they can."""
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if absent:
        return f"{', '.join(absent)} missing: run tools/install-browser as root"
    return None


class WebDriverError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Browser:
    """One chromedriver process and one browser session; :meth:`close` ends both."""

    def __init__(self, width: int = 1100, height: int = 900) -> None:
        self.profile = tempfile.mkdtemp(prefix="egress-agent-chromium-")
        self.proxy = socket.socket()
        self.proxy.bind(("127.0.0.1", 0))
        self.proxy.listen(16)
        self.proxy.setblocking(False)
        proxy_port = self.proxy.getsockname()[1]
        self.port = _free_port()
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.session: Optional[str] = None
        try:
            self._wait_ready()
            args = [
                "--headless=new",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}",
                f"--proxy-server=http://127.0.0.1:{proxy_port}",
                "--proxy-bypass-list=<-loopback>",
                "--host-resolver-rules=MAP * ~NOTFOUND",
                f"--window-size={width},{height}",
            ]
            if os.geteuid() == 0:
                args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
            answer = self._call(
                "POST",
                "/session",
                {
                    "capabilities": {
                        "alwaysMatch": {
                            "browserName": "chrome",
                            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
                        }
                    }
                },
            )
            self.session = answer["sessionId"]
        except BaseException:
            self.close()
            raise

    # -- plumbing --------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = json.loads(error.read() or b"{}")
            value = answer.get("value", {})
            message = f"{method} {path}: {value.get('error')}: {value.get('message')}"
            raise WebDriverError(message) from None
        return answer["value"] if "sessionId" not in answer else answer

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.driver.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self.driver.returncode}")
            with contextlib.suppress(OSError, ValueError):
                if self._call("GET", "/status").get("ready"):
                    return
            time.sleep(0.1)
        raise WebDriverError(f"chromedriver not ready after {START_TIMEOUT}s")

    def _session(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Any:
        return self._call(method, f"/session/{self.session}{path}", body)

    # -- what the tests use ----------------------------------------------------------------

    def get(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        return self._session("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        found = self._session("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def click(self, css: str) -> None:
        self._session("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self._session("POST", f"/element/{self.find(css)}/value", {"text": text})

    def displayed(self, element: str) -> bool:
        return bool(self._session("GET", f"/element/{element}/displayed"))

    def console(self) -> List[Dict[str, Any]]:
        """The browser log since the last call (console messages, CSP violations, failed
        loads), as chromedriver keeps it."""
        return list(self._session("POST", "/se/log", {"type": "browser"}))

    def requests(self) -> List[str]:
        """Every URL the browser asked for since the last call (DevTools Network events)."""
        urls = []
        for entry in self._session("POST", "/se/log", {"type": "performance"}):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def proxy_connections(self) -> int:
        """How many connections reached the proxy (each accepted and closed)."""
        count = 0
        while True:
            try:
                connection, _ = self.proxy.accept()
            except BlockingIOError:
                return count
            connection.close()
            count += 1

    def screenshot(self, path: Path, full_page: bool = True) -> None:
        """A PNG of the page, the whole height of it with ``full_page``."""
        if full_page:
            height = int(self.execute("return document.documentElement.scrollHeight"))
            width = int(self.execute("return document.documentElement.scrollWidth"))
            self._session("POST", "/window/rect", {"width": width + 40, "height": height + 140})
        png = base64.b64decode(self._session("GET", "/screenshot"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png)

    def close(self) -> None:
        if self.session is not None:
            with contextlib.suppress(OSError, WebDriverError, ValueError):
                self._call("DELETE", f"/session/{self.session}")
            self.session = None
        if self.driver.poll() is None:
            self.driver.terminate()
            try:
                self.driver.wait(10)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(5)
        self.proxy.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
