"""A PNG of a web page with headless Chromium (Debian's `chromium`; hack/system-deps.sh installs it):
`screenshot(url, path, basic_auth=(user, password))`, e.g. of Flower's dashboard.

Chromium never talks to the page's server itself. It loads the page from a small HTTP proxy on
loopback that forwards every request to the URL's origin, and only there, adding the basic-auth
header (Chromium refuses credentials in a URL for a page's subresources) and, with `host=`, the
Host header a name-based router (an Ingress controller reached by address) needs. As root,
Chromium runs in a network namespace of its own holding nothing but its loopback and the proxy's
listening socket (made from inside it), so whatever Chromium or one of its background services
tries, no packet leaves this machine; without root the same flags still send every request to
the proxy and make every host name unresolvable.
"""

from __future__ import annotations

import base64
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from . import netns as netns_mod
from .cluster_forward import enter_netns

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "proxy-connection"}
UPSTREAM_TIMEOUT = 20.0


class ScreenshotError(RuntimeError):
    """No screenshot was made (no Chromium, or it failed or timed out); the message says why."""


def screenshot(url: str, path: Path, *, basic_auth: tuple[str, str] | None = None, width: int = 1280,
               height: int = 900, timeout: float = 60, host: str | None = None) -> Path:
    """Save a `width`x`height` PNG of `url` (http only) at `path` and return the path. `basic_auth`
    is sent with every request, `host` replaces the Host header. Waits for the page's own requests
    (up to a few seconds of page time) before the picture is taken."""
    target = urlsplit(url)
    if target.scheme != "http" or not target.hostname:
        raise ScreenshotError(f"screenshot: {url!r} is not an http:// URL")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise ScreenshotError("chromium not found (hack/system-deps.sh installs Debian's `chromium`)")
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    headers = {}
    if basic_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(basic_auth).encode()).decode()
    if host:
        headers["Host"] = host
    isolated = os.geteuid() == 0
    ns = netns_mod.create(prefix="mkss-") if isolated else None
    try:
        listener = _listener(f"/var/run/netns/{ns}" if ns else None)
        proxy = _Proxy(listener, (target.hostname, target.port or 80), headers)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            page = f"http://127.0.0.1:{listener.getsockname()[1]}{target.path or '/'}"
            if target.query:
                page += "?" + target.query
            with tempfile.TemporaryDirectory(prefix="mkss-profile-") as profile:
                argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--disable-extensions", "--disable-default-apps", "--disable-breakpad",
                        "--disable-domain-reliability", "--disable-quic", "--metrics-recording-only",
                        # every request through the proxy (loopback too), no host name resolvable
                        f"--proxy-server=http://127.0.0.1:{listener.getsockname()[1]}",
                        "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                        "--virtual-time-budget=5000", f"--window-size={width},{height}",
                        f"--screenshot={path}", page]
                if ns:
                    argv = ["nsenter", f"--net=/var/run/netns/{ns}", "--", *argv]
                try:
                    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                         env={**os.environ, "HOME": profile})
                except subprocess.TimeoutExpired:
                    raise ScreenshotError(f"chromium took more than {timeout} s for {url}") from None
        finally:
            proxy.shutdown()
            proxy.server_close()
    finally:
        if ns:
            netns_mod.delete(ns)
    if not path.is_file() or path.stat().st_size == 0:
        raise ScreenshotError(f"chromium made no screenshot of {url} ({res.returncode}): {res.stderr[-2000:]}")
    if proxy.errors:
        raise ScreenshotError(f"the page's requests failed: {proxy.errors[:5]}")
    return path


def _listener(netns_path: str | None) -> socket.socket:
    """A listening socket on 127.0.0.1 of the namespace at `netns_path` (this one when None); made by
    a short-lived thread that entered it, as a socket keeps the namespace it was made in."""
    made: list = []

    def make() -> None:
        try:
            if netns_path:
                enter_netns(netns_path)
            made.append(socket.create_server(("127.0.0.1", 0)))
        except OSError as exc:
            made.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    if isinstance(made[0], OSError):
        raise ScreenshotError(f"cannot listen for chromium: {made[0]}")
    return made[0]


class _Proxy(ThreadingHTTPServer):
    """Forwards each request to `upstream` alone, with `headers` set; serves on a ready socket."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, upstream: tuple[str, int], headers: dict):
        super().__init__(listener.getsockname(), _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.upstream, self.headers, self.errors = upstream, headers, []


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no chunking or keep-alive to relay

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _forward(self) -> None:
        server: _Proxy = self.server
        parts = urlsplit(self.path)
        if parts.scheme and (parts.hostname, parts.port or 80) != ("127.0.0.1", server.server_address[1]):
            # a request for anywhere else (a background service through the proxy): refused
            self.send_error(403, "only the page's own server")
            return
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command in ("POST", "PUT") else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "host"}
        headers.setdefault("Host", f"{server.upstream[0]}:{server.upstream[1]}")
        headers.update(server.headers)
        conn = http.client.HTTPConnection(*server.upstream, timeout=UPSTREAM_TIMEOUT)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            server.errors.append(f"{self.command} {path}: {exc}")
            self.send_error(502)
            return
        finally:
            conn.close()
        if resp.status in (401, 403, 407) or resp.status >= 500:  # a missing favicon is no failure
            server.errors.append(f"{self.command} {path}: {resp.status}")
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = _forward
