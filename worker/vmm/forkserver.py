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

A stage request (`{"stage": {"cgroup_procs": [...], "cgroupns": ...}, "cwd": ...}` plus two
descriptors: the reply channel and a control channel) forks the launcher ahead of the launch: it
joins the VM's host cgroup at once, while the worker still prepares the rest of the start, and
then waits on the control channel for `{"argv": [...]}`, the launch itself, sent only once the
start may go ahead, and becomes the supervisor (no launcher to fork one: it is detached already),
which starts the VMM in the group. Such a supervisor is the server's child until the server exits. The control channel's end
without a request ends it having started nothing.

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
import time

MAX_REQUEST = 256 * 1024
REPLY_READ = 64 * 1024
STAGE_WAIT_SECONDS = 3600.0
"""How long a staged launcher waits for its launch request (the worker closing its end, or
dying, ends the wait at once)."""


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


def _valid_stage(request: object) -> tuple[list[str], str | None, str] | None:
    if not isinstance(request, dict) or not isinstance(request.get("stage"), dict):
        return None
    stage, cwd = request["stage"], request.get("cwd")
    procs, namespace = stage.get("cgroup_procs"), stage.get("cgroupns")
    if (not isinstance(procs, list) or not all(isinstance(p, str) for p in procs) or not isinstance(cwd, str)
            or not (namespace is None or isinstance(namespace, str))):
        return None
    return procs, namespace, cwd


def _valid(request: object) -> tuple[list[str], str] | None:
    if not isinstance(request, dict):
        return None
    argv, cwd = request.get("argv"), request.get("cwd")
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or not isinstance(cwd, str):
        return None
    return argv, cwd


def _detach(reply: int, control: int | None = None) -> None:
    """In a forked child: a session of its own, /dev/null as stdin, the reply channel as stdout and
    stderr, the control channel (if any) as descriptor 3, and nothing else open (the server's
    socket, the channels' original numbers)."""
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(reply, 1)
    os.dup2(reply, 2)
    if control is not None:
        os.dup2(control, 3)
    os.closerange(3 if control is None else 4, os.sysconf("SC_OPEN_MAX"))


def _run_reported(run, argv: list[str]) -> int:
    """`run(argv)`'s exit code; what kept it from running is reported on the reply channel, like a
    launcher's stderr."""
    try:
        return run(argv)
    except SystemExit as exc:  # argparse's refusal
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - reported on the reply channel
        sys.stdout.write(json.dumps({"error": f"launcher failed: {type(exc).__name__}: {exc}"}) + "\n")
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def _child(main, argv: list[str], cwd: str, reply: int) -> int:
    """In the forked child: become the launcher of one VM."""
    _detach(reply)

    def run(argv: list[str]) -> int:
        os.chdir(cwd)
        return main(argv)

    return _run_reported(run, argv)


def _staged_child(supervise, join, procs: list[str], namespace: str | None, cwd: str, reply: int, control: int) -> int:
    """In the forked child of a stage request: join the VM's host cgroup now (a first write into
    cgroup.procs can wait a whole RCU grace period, tens of milliseconds), then wait for the launch
    request on `control` and become the VM's supervisor (consolecap.supervise_in_place: it is
    detached already, so no launcher forks one), born in that group like the VMM it starts. The
    end of `control` without a request (the start was given up, or the worker went) ends the
    child having started nothing."""
    _detach(reply, control)
    try:
        os.chdir(cwd)
        join(procs, namespace)
    except OSError as exc:
        sys.stdout.write(json.dumps({"error": f"cannot join the VM's host cgroup: {exc}"}) + "\n")
        sys.stdout.flush()
        return 127
    ctl = socket.socket(fileno=3)
    try:
        ctl.send(json.dumps({"pid": os.getpid()}).encode())  # in the group: for a give-up to wait on
    except OSError:
        return 0
    if not select.select([ctl], [], [], STAGE_WAIT_SECONDS)[0]:
        return 0
    try:
        msg = ctl.recv(MAX_REQUEST)
    except OSError:
        msg = b""
    ctl.close()
    if not msg:
        return 0  # given up: nothing was started
    try:
        request = json.loads(msg)
    except ValueError:
        request = None
    argv = request.get("argv") if isinstance(request, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        sys.stdout.write(json.dumps({"error": "malformed launch request"}) + "\n")
        sys.stdout.flush()
        return 1
    return _run_reported(supervise, argv)


def _parsed(valid, msg: bytes):
    try:
        return valid(json.loads(msg))
    except ValueError:
        return None


def _fork_child(fds: list[int], child, refusal: str | None = None) -> None:
    """Fork a child running `child()` (its return value the exit code), or, with `refusal`, answer
    that on the reply channel (`fds[0]`) instead; the request's descriptors are the child's alone
    after this."""
    if refusal is None:
        try:
            pid = os.fork()
        except OSError as exc:
            refusal = f"cannot fork a launcher: {exc}"
        else:
            if pid == 0:
                code = 1
                try:
                    code = child()
                finally:
                    os._exit(code if isinstance(code, int) else 1)
    if refusal is not None:
        _reply_error(fds[0], refusal)
    for fd in fds:
        os.close(fd)


def serve(ctl: socket.socket, main, join=None, supervise=None) -> None:
    """Answer launch requests on `ctl` until the worker's end closes; stage requests need
    `join(cgroup_procs, cgroupns)`, which joins a host cgroup (consolecap.enter_cgroup), and
    `supervise(argv)`, the supervisor in place (consolecap.supervise_in_place)."""
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
        if len(fds) == 2 and join is not None and supervise is not None:
            stage = _parsed(_valid_stage, msg)
            _fork_child(fds, lambda: _staged_child(supervise, join, *stage, *fds),
                        None if stage is not None else "malformed stage request")
        elif len(fds) == 1:
            launch = _parsed(_valid, msg)
            _fork_child(fds, lambda: _child(main, *launch, fds[0]),
                        None if launch is not None else "malformed launch request")
        else:
            for fd in fds:
                os.close(fd)


def _serve_main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's dir out
    import consolecap  # noqa: PLC0415 - imported once here, before any request
    import ctypes  # noqa: F401,PLC0415 - what consolecap imports only when it enters a namespace

    # argparse's first parse imports and compiles what it needs (milliseconds): done here once, not
    # in every child on its way to the VMM
    consolecap.parse_args(["--state-dir", "/", "--fd", "100=read:/", "--", "true"])

    ctl = socket.socket(fileno=int(sys.argv[1]))
    serve(ctl, consolecap.main, consolecap.enter_cgroup, consolecap.supervise_in_place)
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

    def _send(self, request: bytes, fds: list[int]) -> bool:
        """Hand the server one request with its descriptors; a server dead or wedged is started
        again once. False if it still could not take it (nothing was started then)."""
        for _ in (1, 2):
            try:
                with self._lock:
                    socket.send_fds(self._ensure(), [request], fds)
                return True
            except OSError:
                with self._lock:
                    self.close()
        return False

    def launch(self, argv: list[str], cwd: str, timeout: float) -> str | None:
        """Run consolecap with `argv` in `cwd` through the server; its output (the report line),
        or None if the server could not take the request (nothing was started then)."""
        request = json.dumps({"argv": argv, "cwd": cwd}).encode()
        if len(request) > MAX_REQUEST:
            return None
        reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sent = self._send(request, [theirs.fileno()])
            theirs.close()
            return _read_to_end(reply, timeout) if sent else None
        finally:
            theirs.close()
            reply.close()

    def stage(self, cwd: str, cgroup_procs: list[str], cgroupns: str | None) -> "Staged | None":
        """A launcher forked now that joins the VM's host cgroup at once and then waits for its
        launch request (`Staged.launch`); None if the server could not take the request."""
        request = json.dumps({"stage": {"cgroup_procs": cgroup_procs, "cgroupns": cgroupns}, "cwd": cwd}).encode()
        if len(request) > MAX_REQUEST:
            return None
        reply, reply_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            if self._send(request, [reply_theirs.fileno(), control_theirs.fileno()]):
                return Staged(reply, control)
            reply.close()
            control.close()
            return None
        finally:
            reply_theirs.close()
            control_theirs.close()

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


def _read_to_end(reply: socket.socket, timeout: float) -> str:
    """What a launcher wrote on its reply channel, up to the channel's end."""
    reply.settimeout(timeout)
    chunks = []
    while True:
        data = reply.recv(REPLY_READ)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


class Staged:
    """A launcher in the VM's host cgroup waiting for its launch request: `launch` once (what
    `ForkServer.launch` returns), or `close` to give it up (it exits having started nothing)."""

    GIVE_UP_WAIT = 2.0
    """How long `close` waits for a launcher given up to exit (and so leave the VM's group)."""

    def __init__(self, reply: socket.socket, control: socket.socket):
        self._reply, self._control = reply, control
        self._launched = False

    def launch(self, argv: list[str], timeout: float) -> str:
        """Run consolecap with `argv` in the staged launcher; its output (the report line, or why
        the launcher could not even get that far)."""
        try:
            request = json.dumps({"argv": argv}).encode()
            if len(request) > MAX_REQUEST:
                return json.dumps({"error": "the launch request is too large"})
            self._launched = True
            try:
                self._control.send(request)
            except OSError:
                pass  # the launcher is gone already: its reply says why
            return _read_to_end(self._reply, timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Give the launcher up unless it was launched; once it has exited (the reply channel's
        end, at most GIVE_UP_WAIT seconds), its group can be removed."""
        if self._reply.fileno() < 0:
            return
        if self._launched:
            self._control.close()
            self._reply.close()
            return
        self._launched = True
        deadline = time.monotonic() + self.GIVE_UP_WAIT
        pid = None
        try:
            self._control.settimeout(self.GIVE_UP_WAIT)
            pid = json.loads(self._control.recv(REPLY_READ) or b"{}").get("pid")
        except (OSError, ValueError, AttributeError):
            pass
        self._control.close()
        try:
            self._reply.settimeout(self.GIVE_UP_WAIT)
            while self._reply.recv(REPLY_READ):
                pass
        except OSError:
            pass
        self._reply.close()
        # its descriptors close before it leaves its cgroup: wait for the exit itself
        while isinstance(pid, int) and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.005)


def _running(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has left its cgroup already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    sys.exit(_serve_main())
