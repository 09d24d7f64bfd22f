"""Open a local HTML file in headless Chromium and report what a reader would see.

Talks to Chromium over its DevTools protocol on a pipe (--remote-debugging-pipe: commands
in on fd 3, replies out on fd 4, one NUL-terminated JSON message each), so it needs only
the standard library. Records console errors, uncaught exceptions, log errors (failed
loads) and every network request that is not a file: or data: URL; returns each image's
natural width, the page's scroll width, every table's width against its container's (a table
wider than its box hides columns behind a scrollbar) and a full-page PNG screenshot.

Also a script: `python tests/browser.py PAGE.html OUT.png [WIDTH]` writes the screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-default-apps", "--disable-sync",
         "--hide-scrollbars", "--mute-audio", "--remote-debugging-pipe"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Pipe:
    """A DevTools session over the two pipes; events are kept in arrival order."""

    def __init__(self, write_fd: int, read_fd: int):
        self.w, self.r = write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 60):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            ev = self._read_message(deadline)
            if "method" in ev:
                self.events.append(ev)
                if ev["method"] == method:
                    return ev


def inspect_page(page: Path, width: int = 1400, height: int = 900, chromium: str | None = None,
                 timeout: float = 90) -> dict:
    """Load `page` at `width` CSS pixels; return images, errors, requests, sizes and a screenshot."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def wire_fds():  # in the child: our pipes become its fd 3 (commands) and fd 4 (replies)
        a, b = os.dup(to_child_r), os.dup(from_child_w)
        os.dup2(a, 3)
        os.dup2(b, 4)

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=wire_fds, pass_fds=(3, 4, to_child_r, from_child_w))
        os.close(to_child_r)
        os.close(from_child_w)
        cdp = _Pipe(to_child_w, from_child_r)
        try:
            target = cdp.send("Target.createTarget", {"url": "about:blank"}, session=False, timeout=timeout)
            cdp.session = cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True},
                                   session=False, timeout=timeout)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                cdp.send(f"{domain}.enable")
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            cdp.send("Page.navigate", {"url": Path(page).resolve().as_uri()}, timeout=timeout)
            cdp.wait_for("Page.loadEventFired", timeout=timeout)
            probe = cdp.send("Runtime.evaluate", {"returnByValue": True, "expression": """JSON.stringify({
                images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                                         naturalWidth: i.naturalWidth, width: i.width})),
                scrollWidth: document.documentElement.scrollWidth,
                clientWidth: document.documentElement.clientWidth,
                scrollHeight: document.documentElement.scrollHeight,
                overflowing: [...document.querySelectorAll('body *')].filter(e => {
                    const r = e.getBoundingClientRect(); return r.right > document.documentElement.clientWidth + 1
                        && !e.closest('.scroll');}).map(e => e.tagName + '.' + e.className).slice(0, 10),
                tables: [...document.querySelectorAll('table')].map(t => {
                    const box = t.closest('.scroll') || t.parentElement;
                    return {cls: t.className, width: t.scrollWidth, container: box.clientWidth,
                            scrolls: box.scrollWidth > box.clientWidth + 1};}),
                headings: [...document.querySelectorAll('h1,h2,h3')].map(h => h.textContent)})"""})
            info = json.loads(probe["result"]["value"])
            full = min(int(info["scrollHeight"]), 16000)
            cdp.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": full, "deviceScaleFactor": 1, "mobile": False})
            shot = cdp.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            timeout=timeout)
            info["screenshot"] = base64.b64decode(shot["data"])
            info["console_errors"] = [
                " ".join(str(a.get("value", a.get("description", ""))) for a in ev["params"].get("args", []))
                for ev in cdp.events if ev["method"] == "Runtime.consoleAPICalled"
                and ev["params"].get("type") in ("error", "assert")]
            info["console_errors"] += [
                " ".join(filter(None, (d.get("text"), (d.get("exception") or {}).get("description"))))
                for d in (ev["params"]["exceptionDetails"] for ev in cdp.events
                          if ev["method"] == "Runtime.exceptionThrown")]
            info["console_errors"] += [ev["params"]["entry"].get("text", "")
                                       for ev in cdp.events if ev["method"] == "Log.entryAdded"
                                       and ev["params"]["entry"].get("level") == "error"]
            info["requests"] = [ev["params"]["request"]["url"] for ev in cdp.events
                                if ev["method"] == "Network.requestWillBeSent"]
            try:
                cdp.send("Browser.close", session=False, timeout=10)
            except (RuntimeError, TimeoutError):
                pass
        finally:
            os.close(to_child_w)
            os.close(from_child_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return info


if __name__ == "__main__":  # pragma: no cover - a tool for looking at reports
    width = int(sys.argv[3]) if len(sys.argv) > 3 else 1400
    result = inspect_page(Path(sys.argv[1]), width=width)
    Path(sys.argv[2]).write_bytes(result.pop("screenshot"))
    result["requests"] = [u[:80] for u in result["requests"]]
    print(json.dumps(result, indent=1))
