"""Check a ``longtail report`` HTML page in headless Chromium and save a screenshot.

    python benchmarks/report_chromium.py RUN_DIR/report.html --screenshot docs/img/report.png

Starts ``chromium`` (Debian package ``chromium``) headless with a fresh profile, drives it over the
Chrome DevTools Protocol through a small standard-library WebSocket client (no playwright, no
websocket-client), opens the page and verifies that

(a) nothing is reported as an error: no ``console.error`` / ``console.assert``, no uncaught
    exception, no browser log entry of level ``error`` (e.g. a resource that failed to load);
(b) every ``<img>`` decodes and has ``naturalWidth > 0`` (and ``naturalHeight > 0``);
(c) nothing is wider than the page at ``--width``: neither the document nor any table (a table
    that only fits by scrolling sideways inside its box counts as overflowing).

It then saves a PNG screenshot of the whole page. Exit status 0 when all checks pass, 1 when one
fails, 2 on a usage or browser problem. ``--self-test`` first runs the same checks on a page with a
broken image, a console error and an over-wide table and requires all three to be caught, so a
pass is not vacuous.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Waits for every image to finish decoding, then reports each one's natural size.
IMAGES_JS = """
(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  return imgs.map((i, k) => ({index: k, alt: i.alt, complete: i.complete,
                              naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
                              srcStart: i.currentSrc.slice(0, 30)}));
})()
"""


# Elements wider than the page: the document itself, and any scroll box or table whose content
# is wider than its box (a table that only fits by scrolling sideways counts as overflowing).
OVERFLOW_JS = """
(() => {
  const out = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > window.innerWidth)
    out.push({what: 'page', scrollWidth: doc.scrollWidth, width: window.innerWidth});
  for (const el of document.querySelectorAll('.scroll, table')) {
    const box = el.tagName === 'TABLE' ? el.parentElement : el;
    if (el.scrollWidth > box.clientWidth + 1)
      out.push({what: el.id || el.className || el.tagName.toLowerCase(),
                scrollWidth: el.scrollWidth, width: box.clientWidth});
  }
  return out;
})()
"""


class CDPError(RuntimeError):
    """The browser or the protocol misbehaved."""


# --------------------------------------------------------------------------- a tiny WebSocket


class WebSocket:
    """A minimal RFC 6455 client: text frames out (masked), text / control frames in."""

    def __init__(self, url: str, timeout: float = 30.0):
        if not url.startswith("ws://"):
            raise CDPError(f"unsupported WebSocket URL {url}")
        hostport, _, path = url[len("ws://") :].partition("/")
        host, _, port = hostport.partition(":")
        self.sock = socket.create_connection((host, int(port or 80)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise CDPError("WebSocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status + b" ":
            raise CDPError(f"WebSocket handshake refused: {status.decode(errors='replace')}")
        self._buf = head.split(b"\r\n\r\n", 1)[1]

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise CDPError("WebSocket closed by the browser")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def send(self, text: str) -> None:
        """Send one text message."""
        self._send_frame(0x1, text.encode())

    def recv(self) -> str:
        """The next text message (answers pings, reassembles fragments)."""
        parts: list[bytes] = []
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
                continue
            if opcode == 0x8:
                raise CDPError("WebSocket closed by the browser")
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if b0 & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self.sock.close()


# --------------------------------------------------------------------------- CDP session


class Page:
    """One page target; ``call`` sends a command and returns its result, events are kept."""

    def __init__(self, ws_url: str):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 60.0, **params) -> dict:
        """Send ``method`` with ``params``; returns its result (events seen meanwhile are kept)."""
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)
        raise CDPError(f"{method}: no answer in {timeout:.0f} s")

    def wait_event(self, name: str, timeout: float = 60.0) -> dict:
        """The first event called ``name`` (already received, or the next one to arrive)."""
        for e in self.events:
            if e["method"] == name:
                return e
        deadline = time.monotonic() + timeout
        self.ws.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == name:
                    return msg
        raise CDPError(f"no {name} event in {timeout:.0f} s")

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (late console messages)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.ws.sock.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except TimeoutError:
                break
            if "method" in msg:
                self.events.append(msg)
        self.ws.sock.settimeout(60)


def find_chromium(explicit: str | None) -> str:
    """Path of the browser binary: ``explicit``, else /usr/bin/chromium or one on PATH."""
    for c in [
        explicit,
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]:
        if c and Path(c).is_file():
            return c
    raise CDPError(
        "chromium not found: install the Debian package (apt-get install -y chromium) or pass "
        "--chromium PATH"
    )


@contextlib.contextmanager
def browser(chromium: str, width: int, height: int):
    """A headless Chromium with a fresh profile; yields the DevTools HTTP port."""
    profile = Path(tempfile.mkdtemp(prefix="report-chromium-"))
    log = open(profile.parent / f"{profile.name}.log", "w+b")  # noqa: SIM115
    cmd = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        f"--window-size={width},{height}",
        "--hide-scrollbars",
        "about:blank",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-2000:]
                raise CDPError(f"chromium exited with status {proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                raise CDPError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        yield int(port_file.read_text().split()[0])
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        os.unlink(log.name)
        shutil.rmtree(profile, ignore_errors=True)


def _errors(events: list[dict]) -> list[str]:
    """Error-level console messages, uncaught exceptions and browser log errors."""
    out = []
    for e in events:
        m, p = e["method"], e.get("params", {})
        if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            out.append(f"console.{p['type']}: {args}")
        elif m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return out


def check_page(
    port: int, html: Path, screenshot: Path | None, width: int
) -> tuple[list[str], list[dict], list[dict], tuple[int, int] | None]:
    """Open ``html`` in a new tab.

    Returns (errors, images, overflowing elements, screenshot size).
    """
    url = f"http://127.0.0.1:{port}/json/new?about:blank"
    req = urllib.request.Request(url, method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        target = json.loads(r.read())
    page = Page(target["webSocketDebuggerUrl"])
    try:
        for domain in ("Page", "Runtime", "Log"):
            page.call(f"{domain}.enable")
        page.call("Page.navigate", url=html.resolve().as_uri())
        page.wait_event("Page.loadEventFired")
        res = page.call(
            "Runtime.evaluate", expression=IMAGES_JS, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in res:
            raise CDPError(f"image check script failed: {res['exceptionDetails']}")
        images = res["result"]["value"]
        res = page.call("Runtime.evaluate", expression=OVERFLOW_JS, returnByValue=True)
        if "exceptionDetails" in res:
            raise CDPError(f"overflow check script failed: {res['exceptionDetails']}")
        overflow = res["result"]["value"]
        page.drain(0.5)
        size = None
        if screenshot is not None:
            metrics = page.call("Page.getLayoutMetrics")
            content = metrics.get("cssContentSize") or metrics["contentSize"]
            h = int(content["height"]) + 1
            shot = page.call(
                "Page.captureScreenshot",
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": width, "height": h, "scale": 1},
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            tmp = screenshot.with_name(f".{screenshot.name}.tmp-{os.getpid()}")
            tmp.write_bytes(base64.b64decode(shot["data"]))
            os.replace(tmp, screenshot)
            size = (width, h)
        return _errors(page.events), images, overflow, size
    finally:
        page.ws.close()


def _bad_images(images: list[dict]) -> list[dict]:
    return [i for i in images if not (i["naturalWidth"] > 0 and i["naturalHeight"] > 0)]


SELF_TEST_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head>
<body><img alt="good" src="data:image/png;base64,{png}">
<img alt="broken" src="data:image/png;base64,AAAA">
<div class="scroll" style="width:100px;overflow-x:auto"><table id="wide"><tr>
<td style="white-space:nowrap">a cell far wider than its one-hundred-pixel box</td></tr>
</table></div>
<script>console.error("deliberate self-test error")</script></body></html>"""

# A 1x1 PNG.
ONE_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def self_test(port: int, width: int) -> None:
    """The checks must catch a broken image and a console error on a page made to have both."""
    with tempfile.TemporaryDirectory() as d:
        page = Path(d) / "bad.html"
        page.write_text(SELF_TEST_PAGE.format(png=ONE_PIXEL_PNG))
        errors, images, overflow, _ = check_page(port, page, None, width)
    bad = [i["alt"] for i in _bad_images(images)]
    caught_console = any("deliberate self-test error" in e for e in errors)
    wide = sorted({o["what"] for o in overflow})
    if bad != ["broken"] or not caught_console or wide != ["scroll", "wide"]:
        raise CDPError(
            f"self-test failed: broken images flagged {bad} (expected ['broken']), "
            f"console error caught: {caught_console}; errors={errors}; overflowing {wide} "
            "(expected ['scroll', 'wide'])"
        )
    print(
        f"self-test: broken <img>, console.error ({len(errors)} error(s)) and a table wider "
        "than its box all caught"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (0 pass, 1 fail, 2 error)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("html", type=Path, help="report.html to check")
    p.add_argument(
        "--screenshot", type=Path, default=None, help="PNG to write (default: beside the HTML)"
    )
    p.add_argument("--chromium", default=None, help="browser binary (default /usr/bin/chromium)")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    p.add_argument("--self-test", action="store_true", help="first prove the checks catch errors")
    a = p.parse_args(argv)
    if not a.html.is_file():
        print(f"error: {a.html} does not exist", file=sys.stderr)
        return 2
    shot = a.screenshot or a.html.with_name(a.html.stem + "_chromium.png")
    try:
        chromium = find_chromium(a.chromium)
        version = subprocess.run(
            [chromium, "--version"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        print(f"browser: {version} ({chromium})")
        with browser(chromium, a.width, 900) as port:
            if a.self_test:
                self_test(port, a.width)
            t0 = time.perf_counter()
            errors, images, overflow, size = check_page(port, a.html, shot, a.width)
            dt = time.perf_counter() - t0
    except CDPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = _bad_images(images)
    print(f"page: {a.html} ({a.html.stat().st_size:,} bytes), loaded and checked in {dt:.1f} s")
    print(f"console/log errors: {len(errors)}")
    for e in errors:
        print(f"  {e}")
    print(f"images: {len(images)}, with naturalWidth > 0: {len(images) - len(bad)}")
    for i in images:
        flag = "ok " if i not in bad else "BAD"
        print(f"  {flag} #{i['index']} {i['naturalWidth']}x{i['naturalHeight']}  {i['alt']}")
    print(f"horizontal overflow at {a.width} CSS px: {len(overflow)} element(s)")
    for o in overflow:
        print(f"  {o['what']}: content {o['scrollWidth']} px in a {o['width']} px box")
    if size:
        print(f"screenshot: {shot} ({size[0]}x{size[1]} CSS px, {shot.stat().st_size:,} bytes)")
    ok = not errors and not bad and bool(images) and not overflow
    if not images:
        print("FAIL: the page has no <img>")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
