"""`python -m mikrom.worker console-relay UID`: a VM's interactive serial console on stdin/stdout.

It connects to the console socket the VM's supervisor keeps (`<state dir>/vms/UID/console.sock`,
see worker/vmm/consolecap.py) and copies stdin to it and what it sends to stdout, until either
side ends. `kubectl mikrom console NAME` runs it through `kubectl exec -i` in the node's worker
pod when the node is not the machine it runs on; the plugin, not the relay, owns the terminal
(raw mode, Ctrl-] to detach). The socket is root's (0600), so the relay works only as root, as
the worker container runs. Its own process: nothing here touches the worker's gevent hub.
Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import socket
import sys

from .vmm.consolecap import CONSOLE_SOCKET, unix_address

UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
"""A MicroVM's uid as its state directory is named (a Kubernetes UID)."""
CONNECT_TIMEOUT = 5.0


class RelayError(Exception):
    """The console cannot be reached; the message says why. Exit status 1."""


def console_socket(state_dir: str, uid: str) -> str:
    if not UID.match(uid):
        raise RelayError(f"{uid!r} is not a MicroVM uid")
    return os.path.join(state_dir, "vms", uid, CONSOLE_SOCKET)


def connect(path: str) -> socket.socket:
    if not os.path.exists(path):
        raise RelayError(f"no console socket at {path}: the VM does not run on this node")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(CONNECT_TIMEOUT)
    address, dirfd = unix_address(path)
    try:
        sock.connect(address)
    except OSError as exc:
        sock.close()
        raise RelayError(f"cannot connect to {path}: {exc.strerror or exc} (is the VM running?)") from None
    finally:
        if dirfd is not None:
            os.close(dirfd)
    sock.setblocking(True)
    sock.settimeout(None)
    return sock


def relay(sock: socket.socket, stdin: int = 0, stdout: int = 1) -> int:
    """Copy until stdin ends (0: the user detached) or the supervisor hangs up (1)."""
    while True:
        readable, _, _ = select.select([stdin, sock], [], [])
        if sock in readable:
            data = sock.recv(65536)
            if not data:
                return 1
            _write_all(stdout, data)
        if stdin in readable:
            data = os.read(stdin, 65536)
            if not data:
                return 0
            sock.sendall(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mikrom.worker console-relay", description=__doc__.splitlines()[0])
    parser.add_argument("uid", help="the MicroVM's metadata.uid")
    parser.add_argument("--state-dir", default=os.environ.get("MIKROM_STATE_DIR", "/var/lib/mikrom"),
                        help="the node's state directory (default $MIKROM_STATE_DIR or /var/lib/mikrom)")
    args = parser.parse_args(argv)
    try:
        sock = connect(console_socket(args.state_dir, args.uid))
    except RelayError as exc:
        print(f"mikrom console-relay: {exc}", file=sys.stderr)
        return 1
    with sock:
        try:
            return relay(sock)
        except (BrokenPipeError, ConnectionResetError):
            return 1
