"""A fork server for VMM supervisors: the launcher (consolecap.py) without a Python start per VM.

Starting `python -I consolecap.py` costs the interpreter's start and consolecap's imports, tens of
milliseconds before the supervisor even looks at the lease, which a create waits for. So the worker
starts this program once, as

    python -I -S forkserver.py FD

with the same clean environment a launcher gets (sandbox.vmm_environment: nothing of the
worker's), and it imports consolecap and waits. FD is its end of a SOCK_SEQPACKET socket pair that
only the worker holds the other end of (no path anyone else could connect to). Each request is one
packet: `{"argv": [consolecap's arguments], "cwd": the VM's state dir}` plus one descriptor, the
reply channel. For each, the server forks a child that is exactly the old launcher: it starts a
session of its own, has /dev/null as stdin and the reply channel as stdout and stderr, closes every
other descriptor, enters the state dir and runs `consolecap.main(argv)`, which forks the supervisor
and writes its one-line JSON report once the VMM runs (or why not), then exits. The server reaps
its children. Everything the supervisor checks before it starts the VMM (the fence lease first of
all) is consolecap's and unchanged.

The server exits when the worker's end closes (the worker stopped or died); supervisors are not
its children by then, so VMs never depend on it. On the worker's side (`ForkServer`), a server
that cannot be started or reached makes `launch` return None, and the caller runs the launcher as
a process of its own instead. A supervisor forked here carries this program's command line, so it
is recognised by its working directory (the VM's state dir) and `forkserver.py` or `consolecap.py`
on its command line (base.is_supervisor).

Standard library only; the worker imports this module for `ForkServer`, which is gevent-friendly
(sockets and a subprocess, monkey-patched under the gevent worker).
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading

MAX_REQUEST = 256 * 1024
REPLY_READ = 64 * 1024


# ---------------------------------------------------------------------------------- the server

def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _reply_error(fd: int, message: str) -> None:
    try:
        os.write(fd, (json.dumps({"error": message}) + "\n").encode())
    except OSError:
        pass


def _valid(request: object) -> tuple[list[str], str] | None:
    if not isinstance(request, dict):
        return None
    argv, cwd = request.get("argv"), request.get("cwd")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not isinstance(cwd, str):
        return None
    return argv, cwd


def _child(main, argv: list[str], cwd: str, reply: int) -> int:
    """In the forked child: become the launcher of one VM."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(reply, 1)
    os.dup2(reply, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the server's socket, the reply's original number
    try:
        os.chdir(cwd)
        return main(argv)
    except SystemExit as exc:  # argparse's refusal
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - reported on the reply channel, like a launcher's stderr
        sys.stdout.write(json.dumps({"error": f"launcher failed: {type(exc).__name__}: {exc}"}) + "\n")
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def serve(ctl: socket.socket, main) -> None:
    """Answer launch requests on `ctl` until the worker's end closes."""
    while True:
        _reap()
        try:
            if not select.select([ctl], [], [], 1.0)[0]:
                continue
            msg, fds, _flags, _addr = socket.recv_fds(ctl, MAX_REQUEST, 4)
        except InterruptedError:
            continue
        if not msg and not fds:
            return  # the worker went away
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        reply = fds[0]
        try:
            parsed = _valid(json.loads(msg))
        except ValueError:
            parsed = None
        if parsed is None:
            _reply_error(reply, "malformed launch request")
            os.close(reply)
            continue
        try:
            pid = os.fork()
        except OSError as exc:
            _reply_error(reply, f"cannot fork a launcher: {exc}")
            os.close(reply)
            continue
        if pid == 0:
            code = 1
            try:
                code = _child(main, *parsed, reply)
            finally:
                os._exit(code if isinstance(code, int) else 1)
        os.close(reply)


def _serve_main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's dir out
    import consolecap  # noqa: PLC0415 - imported once here, before any request
    import ctypes  # noqa: F401,PLC0415 - what consolecap imports only when it enters a namespace

    ctl = socket.socket(fileno=int(sys.argv[1]))
    serve(ctl, consolecap.main)
    return 0


# ---------------------------------------------------------------------------------- the client

class ForkServer:
    """The worker's handle on its fork server, started on first use and again if it died."""

    def __init__(self, env: dict):
        self.env = env
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None

    def _ensure(self) -> socket.socket:
        if self._proc is not None and self._proc.poll() is None and self._ctl is not None:
            return self._ctl
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                env=self.env, start_new_session=True, cwd="/")
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._ctl = ours
        return ours

    def launch(self, argv: list[str], cwd: str, timeout: float) -> str | None:
        """Run consolecap with `argv` in `cwd` through the server; its output (the report line),
        or None if the server could not take the request (nothing was started then)."""
        request = json.dumps({"argv": argv, "cwd": cwd}).encode()
        if len(request) > MAX_REQUEST:
            return None
        reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for attempt in (1, 2):
                try:
                    with self._lock:
                        socket.send_fds(self._ensure(), [request], [theirs.fileno()])
                    break
                except OSError:
                    with self._lock:
                        self.close()  # dead or wedged: the next attempt starts a new one
                    if attempt == 2:
                        return None
            theirs.close()
            reply.settimeout(timeout)
            chunks = []
            while True:
                data = reply.recv(REPLY_READ)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
        finally:
            theirs.close()
            reply.close()

    def close(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None


if __name__ == "__main__":
    sys.exit(_serve_main())
