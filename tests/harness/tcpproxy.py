"""A TCP forwarder on loopback that a test can cut and restore: put in front of the API server for
one worker (`forwarded_kubeconfig`), it cuts that worker off while the rest of the test, and the
other workers, still reach the server.

`cut()` closes the listening port (new connections are refused) and shuts every connection through
it; `restore()` listens on the same port again, so the kubeconfig that names it works once more.
"""

from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlsplit

import pytest
import yaml

from .waits import wait_for


class TcpForwarder:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.port = 0
        self._listen(socket.create_server(("127.0.0.1", 0)))

    def _listen(self, listener: socket.socket) -> None:
        self.listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self.lock:
                if listener is not self.listener:  # cut meanwhile
                    conn.close()
                    upstream.close()
                    return
                self.conns += [conn, upstream]
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                for s in select.select([a, b], [], [], 0.2)[0]:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):  # shut or closed by cut()
            pass
        finally:
            a.close()
            b.close()

    @property
    def is_open(self) -> bool:
        return self.listener is not None

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        if listener is not None:
            listener.close()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self, timeout: float = 10) -> None:
        """Listen on the same port again."""
        if self.listener is None:
            self._listen(wait_for(lambda: _bind(self.port), timeout, f"port {self.port} to be free again"))

    close = cut


def _bind(port: int) -> socket.socket | None:
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError:
        return None


@pytest.fixture
def forwarded_kubeconfig(worker_kubeconfig, tmp_path):
    """`make(name)`: a copy of the worker's kubeconfig that reaches the API server through a
    TcpForwarder of its own, and that forwarder (closed at teardown)."""
    made: list[TcpForwarder] = []

    def make(name: str = "forwarded") -> tuple:
        cfg = yaml.safe_load(worker_kubeconfig.read_text())
        server = urlsplit(cfg["clusters"][0]["cluster"]["server"])
        fwd = TcpForwarder((server.hostname, server.port))
        made.append(fwd)
        cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{fwd.port}"
        path = tmp_path / f"{name}.kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        return path, fwd

    yield make
    for fwd in made:
        fwd.close()
