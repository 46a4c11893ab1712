"""Headless Chromium driven over the DevTools protocol (a websocket), for the report's browser test,
its screenshots and its page-load timing. No browser download: it uses the system's Chromium.

    python -m bench.browser OUT/report/index.html [--shots docs/] [--runs 5]

prints the time from navigation start until the report's app has rendered its first page
(median of --runs loads) and, with --shots, writes report-clusters.png and report-pair.png.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*"]


def find_chromium() -> str | None:
    for name in (CHROMIUM, "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page. `events` keeps every DevTools event received."""

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900):
        import websocket  # websocket-client (test extra)
        self.executable = executable or find_chromium()
        if not self.executable:
            raise FileNotFoundError("chromium not found: install it (make browser)")
        self.profile = tempfile.mkdtemp(prefix="dedupe-chromium-")
        self.proc = subprocess.Popen([self.executable, *FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.events: list[dict] = []
        self._id = 0
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {expression}")
            time.sleep(0.05)

    def open(self, url: str, ready: str = "document.body && document.body.dataset.ready === '1'") -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.readyState === 'complete' && {ready}")

    def screenshot(self, path: str | Path, full_page: bool = False) -> None:
        params = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", **params)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions, failed loads and JS dialogs seen so far."""
        found = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description') or p['exceptionDetails'].get('text')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                  for a in p.get("args", [])))
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                found.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Page.javascriptDialogOpening":
                found.append(f"dialog: {p.get('message')}")
        return found

    def close(self) -> None:
        # Chromium keeps its singleton socket in a folder of its own under /tmp, linked from the
        # profile, and leaves it there when it exits: removed with the profile
        socket_dir = None
        with contextlib.suppress(OSError):
            socket_dir = Path(os.readlink(Path(self.profile, "SingletonSocket"))).parent
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.call("Browser.close")
                except Exception:
                    pass
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)
            if socket_dir is not None and socket_dir.name.startswith("org.chromium.Chromium."):
                shutil.rmtree(socket_dir, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_ms(browser: Browser, url: str) -> float:
    """Navigation start -> the app's first page rendered (ms, measured by the page itself)."""
    browser.open("about:blank", ready="true")
    browser.open(url)
    return float(browser.evaluate("window.DEDUPE_READY_MS"))


def drawn_pair(browser: Browser) -> int | None:
    """A drawn duplicate pair with outliers too (the lowest inlier share): both line colours."""
    return browser.evaluate("(function(){var p=window.DEDUPE_REPORT.pairs,best=null,share=2;"
                            "for(var i=0;i<p.length;i++){if(p[i][11]&&p[i][9]&&p[i][3]){"
                            "var s=p[i][4]/p[i][3];if(s<share){share=s;best=i;}}}return best;})()")


def small_png(path: Path) -> None:
    """Re-save a screenshot with a 256-colour palette (docs images: a third of the size)."""
    from PIL import Image
    with Image.open(path) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", help="OUT/report/index.html")
    ap.add_argument("--shots", help="folder for report-clusters.png and report-pair.png")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    url = Path(args.index).resolve().as_uri()
    with Browser(width=1100, height=900) as b:
        times = [load_ms(b, url) for _ in range(args.runs)]
        print(f"index load to first page rendered: median {statistics.median(times):.0f} ms "
              f"(min {min(times):.0f}, max {max(times):.0f}, {args.runs} loads)")
        if args.shots:
            out = Path(args.shots)
            out.mkdir(parents=True, exist_ok=True)
            b.evaluate("document.querySelectorAll('img').forEach(function(i){i.loading='eager'})")
            b.wait_for("Array.from(document.images).every(function(i){return i.complete})")
            b.screenshot(out / "report-clusters.png")
            small_png(out / "report-clusters.png")
            i = drawn_pair(b)
            if i is not None:
                b.evaluate(f"location.hash = 'pair={i}'")
                b.wait_for("document.querySelector('#pair-view img.drawing') && "
                           "document.querySelector('#pair-view img.drawing').naturalWidth > 0")
                b.wait_for("Array.from(document.images).every(function(i){return i.complete})")
                b.screenshot(out / "report-pair.png")
                small_png(out / "report-pair.png")
        errors = b.errors()
    for e in errors:
        print("browser error:", e)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
