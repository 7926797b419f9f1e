"""A TCP forwarder from the host's loopback into the test cluster's network namespace.

The cluster has no route out and the host has no route in: this is the only door, and it opens
only on the host's 127.0.0.1. The listening sockets are made first, in the host's namespace; then
the process moves into the cluster's namespace (setns), so every socket it makes afterwards (the
connections it forwards to) is inside. A socket stays in the namespace it was made in.

    python cluster_forward.py --netns /var/run/netns/NAME --ports-file FILE NAME=HOST:PORT...

writes `{"NAME": host_port, ...}` to FILE (atomically) once every listener is up, and forwards each
connection to NAME's HOST:PORT inside the namespace until it is stopped. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 3600.0
"""A forwarded connection with no byte either way for this long is closed (watches send bookmarks
and exec streams keep-alives far more often)."""


def enter_netns(path: str) -> None:
    """Move the calling thread (and every thread it starts later) into the namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # half-close: the other direction may still be sending
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _serve_one(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT)
    except OSError:
        client.close()
        return
    for s in (client, upstream):
        s.settimeout(IDLE_TIMEOUT)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _accept_loop(listener: socket.socket, target: tuple[str, int]) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(client, target), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--netns", required=True)
    ap.add_argument("--ports-file", required=True)
    ap.add_argument("routes", nargs="+", metavar="NAME=HOST:PORT")
    args = ap.parse_args(argv)

    listeners = {}
    for route in args.routes:
        name, _, dest = route.partition("=")
        host, _, port = dest.rpartition(":")
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))  # the host's loopback, before leaving the host's namespace
        s.listen(64)
        listeners[name] = (s, (host, int(port)))

    enter_netns(args.netns)

    ports = {name: s.getsockname()[1] for name, (s, _) in listeners.items()}
    tmp = Path(args.ports_file + ".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.rename(args.ports_file)

    threads = [threading.Thread(target=_accept_loop, args=(s, target), daemon=True)
               for s, target in listeners.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
