"""A counting front of the API server: a client's kubeconfig names it, and each request it makes is
recorded (time, method, path, query, body) before it goes on to the real kube-apiserver over TLS.

For tests that count what a component asks of the API server (a create reads its MicroVM once).
It listens on loopback only, speaks plain HTTP to the client (who still sends its bearer token,
checked by the API server as usual) and verifies the API server's certificate with the cluster's
CA. Responses are passed back with their status and headers, a stream (a watch) piece by piece
as it comes.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te",
              "trailer", "upgrade"}


@dataclass
class Request:
    at: float
    """Wall clock (time.time()) when the request arrived."""
    method: str
    path: str
    query: str
    body: bytes


class CountingProxy:
    def __init__(self, kubeconfig: Path):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        cluster = cfg["clusters"][0]["cluster"]
        target = urlsplit(cluster["server"])
        self.target = (target.hostname, target.port or 443)
        self.ssl = ssl.create_default_context()
        if cluster.get("certificate-authority-data"):
            self.ssl.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        elif cluster.get("certificate-authority"):
            self.ssl.load_verify_locations(cafile=cluster["certificate-authority"])
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            upstream: http.client.HTTPSConnection | None = None

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                with proxy.lock:
                    proxy.requests.append(Request(time.time(), self.command, url.path, url.query, body))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host"}}
                for attempt in (1, 2):
                    if self.upstream is None:
                        self.upstream = http.client.HTTPSConnection(*proxy.target, context=proxy.ssl, timeout=600)
                    try:
                        self.upstream.request(self.command, self.path, body=body or None, headers=headers)
                        resp = self.upstream.getresponse()
                        break
                    except (OSError, http.client.HTTPException):
                        self.upstream.close()
                        self.upstream = None
                        if attempt == 2:
                            self.send_error(502)
                            return
                self.send_response(resp.status, resp.reason)
                for key, value in resp.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                if resp.getheader("Content-Length") is not None:
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                # a stream (a watch): passed on piece by piece as it comes
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while True:
                    piece = resp.read1(65536)
                    if not piece:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, kubeconfig: Path, path: Path | None = None) -> Path:
        """A copy of `kubeconfig` (a token one) whose server is this proxy."""
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        for entry in cfg["clusters"]:
            entry["cluster"] = {"server": f"http://127.0.0.1:{self.port}"}
        if path is None:
            path = Path(tempfile.mkstemp(suffix=".kubeconfig")[1])
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def seen(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (path is None or r.path == path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "CountingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
