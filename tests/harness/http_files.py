"""A real HTTP server on 127.0.0.1 serving a directory's files and counting GETs (image downloads),
so a test can prove a file was fetched once, or never again."""

from __future__ import annotations

import collections
import http.server
import threading


class FileServer:
    """A real HTTP server on 127.0.0.1 serving files from a directory, counting GETs per path.
    Use it as a context manager, or call `close()`."""

    def __init__(self, root, delay: float = 0.0):
        """`delay`: seconds each GET waits before its answer (a slow remote, for long downloads)."""
        self.hits: list[str] = []
        """Every GET's path, in arrival order."""
        self._lock = threading.Lock()
        server_self = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):
                with server_self._lock:
                    server_self.hits.append(self.path)
                if delay:
                    threading.Event().wait(delay)
                try:
                    super().do_GET()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on purpose (size cap)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def count(self, name: str) -> int:
        """How many GETs asked for `name` (a file name relative to the root)."""
        return self.counts()["/" + name.lstrip("/")]

    def counts(self) -> collections.Counter:
        """GETs per path so far."""
        with self._lock:
            return collections.Counter(self.hits)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> "FileServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
