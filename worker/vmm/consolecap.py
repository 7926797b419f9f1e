"""Launch a VMM detached from the worker and keep its console log within a size cap.

    python -I consolecap.py --state-dir DIR --max-bytes N [--ready-marker TEXT] -- VMM ARGV...

Run by the drivers (base.Driver.start), never by hand: normally as `consolecap.main(argv)` in a
child of the worker's fork server (worker/vmm/forkserver.py, which spares a Python start per VM),
or as the command above when the fork server cannot be reached. The process tree it leaves is

    worker ──(exits at once)── launcher
    supervisor (this file, forked, orphaned) ── VMM

(or, for a launcher the fork server staged ahead of the launch, `supervise_in_place`: that child,
detached already, is the supervisor itself, one fork fewer on the way to the VMM).

The launcher forks the supervisor and exits as soon as the VMM runs, so the worker reaps its only
child right away and never collects zombies, and a worker that is killed leaves the VM untouched.
The supervisor is the VMM's parent: it reaps the VMM (so a stopped VMM never lingers as a zombie),
drains the VMM's console (serial on stdout, plus stderr) from a pipe into `console.log`, and
rotates it to `console.log.1` whenever it reaches half the cap, so both together stay below
`--max-bytes`. It also keeps the serial port's interactive side: the VMM's stdin is a pipe the
supervisor writes, and `console.sock` in the state dir (a unix socket, 0600, root's; connecting
peers other than root are refused) relays between the serial port and one attached client at a
time, a second one being told the console is busy (ConsoleRelay). The log is written whether or
not a client is attached. It also writes, in the state dir:

  pid         the VMM's pid (adoption reads it after a worker restart)
  run.json    pid, supervisor pid, start time (wall clock and CLOCK_MONOTONIC, which is system-wide),
              and when each step of the launch ended (CLOCK_MONOTONIC)
  ready       the time the ready marker first appeared on the console
  exit.json   the VMM's exit status, once it has exited
  fence.json  why the supervisor stopped its VMM by itself (its node's lease expired), if it did

Fencing: the supervisor does not depend on a live worker to stop its VMM. Beside the VMs' state
directories lies the node's lease (`<vms>/fence-lease.json`, see worker/lease.py), whose content
is a CLOCK_BOOTTIME deadline that the worker pushes forward while it may. Once the file exists,
the supervisor checks it every second; when the deadline has passed (or the file has gone), it
records fence.json, asks the VMM to stop (SIGTERM), kills it `kill_after_seconds` later, and exits
once it has reaped it. It refuses to start a VMM under an expired lease. CLOCK_BOOTTIME is shared
with the worker and also counts time the host was suspended, so a node waking from a long freeze
stops its VMMs within a second. No lease file at all (a driver used without a worker) fences
nothing. Every VMM start and stop is appended, with its CLOCK_BOOTTIME time, to the node's
journal `<vms>/vmm-journal.jsonl`, which outlives the VM's directory (the tests' overlap check).

Before it starts the VMM, the supervisor may join the VM's network namespace (`--netns`), open
files, taps and the control socket as root and hand them to the VMM as descriptors (`--fd`), so
that the VMM itself can drop to the VM's own uid and gid (`--run-as`, `--groups`) and needs no
right to any path. The VMM gets only PATH and LANG of the supervisor's environment.

Standard library only, and run with `python -I`, so it works whatever the worker's import path.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback

READ_SIZE = 64 * 1024
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
VMM_ENV = ("PATH", "LANG")
"""The only variables the VMM gets (the launcher already gives the supervisor no more)."""

# fencing and the journal (see the module docstring; the worker side is worker/lease.py)
LEASE_FILE = "fence-lease.json"
FENCE_FILE = "fence.json"
JOURNAL_FILE = "vmm-journal.jsonl"
JOURNAL_MAX_BYTES = 4 << 20
"""The journal is rotated to `vmm-journal.jsonl.1` past this size."""
LEASE_CHECK_SECONDS = 1.0
DEFAULT_KILL_AFTER = 5.0


def boottime() -> float:
    """CLOCK_BOOTTIME: monotonic, system-wide, and counting suspended time."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def node_dir(state: str) -> str:
    """The directory holding the VMs' state directories, where the lease and journal live."""
    return os.path.dirname(os.path.abspath(state.rstrip("/")))


def read_lease(path: str) -> dict | None:
    """The lease's content; None if there is no lease file, {} if it cannot be read or parsed."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lease_verdict(lease: dict | None, now: float, armed: bool) -> tuple[str, str]:
    """("unarmed" | "valid" | "expired", why) for a lease read at CLOCK_BOOTTIME `now`; `armed`:
    a lease was seen before (then a missing file is an expired lease, not no lease)."""
    if lease is None:
        return ("expired", "the lease file was removed") if armed else ("unarmed", "no lease file")
    deadline = lease.get("expires_boottime")
    if not isinstance(deadline, (int, float)) or isinstance(deadline, bool):
        return "expired", "the lease file is unreadable"
    if now >= deadline:
        return "expired", f"the lease expired {now - deadline:.1f}s ago (renewed by {lease.get('node', '?')} " \
                          f"for {lease.get('ttl_seconds', '?')}s, last because {lease.get('why', '?')})"
    return "valid", f"{deadline - now:.1f}s left"


def journal(state: str, event: str, **fields) -> None:
    """Append one event to the node's VMM journal; never fails the supervisor."""
    path = os.path.join(node_dir(state), JOURNAL_FILE)
    record = {"event": event, "uid": os.path.basename(state.rstrip("/")), "boottime": boottime(),
              "monotonic": time.monotonic(), "at": time.time(), **fields}
    try:
        try:
            if os.stat(path).st_size > JOURNAL_MAX_BYTES:
                os.replace(path, path + ".1")
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RotatingLog:
    """console.log plus one rotated generation, at most `max_bytes` together."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.limit = max(max_bytes // 2, 1)
        self.fd = -1
        self.size = 0
        self._open(truncate=True)

    def _open(self, truncate: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        self.fd = os.open(self.path, flags, 0o640)
        self.size = os.fstat(self.fd).st_size

    def write(self, data: bytes) -> None:
        while data:
            room = self.limit - self.size
            if room <= 0:
                self.rotate()
                continue
            part, data = data[:room], data[room:]
            # Unbuffered: whoever tails the log sees output as soon as the guest prints it.
            os.write(self.fd, part)
            self.size += len(part)

    def rotate(self) -> None:
        os.close(self.fd)
        os.replace(self.path, self.path + ".1")
        self._open(truncate=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------- the interactive console socket
CONSOLE_SOCKET = "console.sock"
"""The serial console's interactive side, in the VM's state dir (0600, root's)."""
CLIENT_BUFFER_BYTES = 64 * 1024
"""Console output held for a client that reads slowly; past it the oldest bytes are dropped for
that client (console.log has them all), so a slow client never stalls the supervisor."""
INPUT_BUFFER_BYTES = 64 * 1024
"""Client input held while the VMM's serial does not take it; past it the client is not read
(back-pressure on the client only)."""
UNIX_PATH_MAX = 108
BUSY_MESSAGE = (b"\r\nmikrom: this VM's console is in use by another client; it takes one at a time "
                b"(`kubectl mikrom console --follow` reads the log meanwhile)\r\n")
DENIED_MESSAGE = b"\r\nmikrom: only root may attach to a VM's console\r\n"


def unix_address(path: str) -> tuple[str, int | None]:
    """An address for bind/connect of `path`: itself, or when it is longer than sun_path allows,
    the same file through a descriptor of its directory (/proc/self/fd/N/NAME); the descriptor
    (or None), for the caller to close."""
    if len(os.fsencode(path)) < UNIX_PATH_MAX:
        return path, None
    dirfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{dirfd}/{os.path.basename(path)}", dirfd


def listen_console(path: str) -> socket.socket:
    """Bind the console socket at `path`, 0600 from the start (umask while binding), non-blocking."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # the previous boot's
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    address, dirfd = unix_address(path)
    old = os.umask(0o177)
    try:
        sock.bind(address)
        sock.listen(4)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
        if dirfd is not None:
            os.close(dirfd)
    os.chmod(path, 0o600)
    return sock


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ConsoleRelay:
    """Relays bytes between the VMM's serial port (its stdin; its output reaches `output()` from
    the supervise loop) and at most one client of the console socket.

    One client at a time: a second one is told the console is busy and closed; the attached
    client keeps it until it disconnects. Every descriptor is non-blocking and every buffer
    bounded, so a client that stops reading, sends too much or vanishes costs the supervisor
    nothing but that client's bytes."""

    def __init__(self, path: str, vmm_stdin: int):
        self.path = path
        self.listener = listen_console(path)
        self.inode = os.stat(path).st_ino
        self.vmm_stdin: int | None = vmm_stdin
        os.set_blocking(vmm_stdin, False)
        self.client: socket.socket | None = None
        self.to_client = bytearray()
        self.to_vmm = bytearray()

    def readers(self) -> list:
        rs = [self.listener]
        if self.client is not None and len(self.to_vmm) < INPUT_BUFFER_BYTES:
            rs.append(self.client)
        return rs

    def writers(self) -> list:
        ws = [self.client] if self.client is not None and self.to_client else []
        return ws + ([self.vmm_stdin] if self.vmm_stdin is not None and self.to_vmm else [])

    def output(self, chunk: bytes) -> None:
        """What the VMM printed, for the attached client."""
        if self.client is None:
            return
        self.to_client += chunk
        if len(self.to_client) > CLIENT_BUFFER_BYTES:
            del self.to_client[:len(self.to_client) - CLIENT_BUFFER_BYTES]

    def service(self, readable: list, writable: list) -> None:
        # the client first: one that hung up just before another connected has let go already
        if self.client is not None and self.client in readable:
            self._from_client()
        if self.listener in readable:
            self._accept()
        if self.client is not None and self.client in writable:
            try:
                sent = self.client.send(self.to_client)
                del self.to_client[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop_client()
        if self.vmm_stdin is not None and self.vmm_stdin in writable:
            try:
                written = os.write(self.vmm_stdin, self.to_vmm[:READ_SIZE])
                del self.to_vmm[:written]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # the VMM closed its serial input (it is exiting): input goes nowhere
                os.close(self.vmm_stdin)
                self.vmm_stdin = None
                self.to_vmm.clear()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # nobody waiting after all, or no descriptor left: the attached client stays
            return
        conn.setblocking(False)
        try:
            if peer_uid(conn) != os.geteuid():
                refusal = DENIED_MESSAGE
            elif self.client is not None and not self._client_gone():
                refusal = BUSY_MESSAGE
            else:
                self.client = conn
                self.to_client.clear()
                return
            try:
                conn.send(refusal)
            except OSError:
                pass
            conn.close()
        except OSError:
            conn.close()

    def _client_gone(self) -> bool:
        """Whether the attached client has hung up (its end-of-file is waiting to be read)."""
        try:
            if self.client.recv(1, socket.MSG_PEEK) == b"":
                self._drop_client()
                return True
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop_client()
            return True
        return False

    def _from_client(self) -> None:
        try:
            data = self.client.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        if self.vmm_stdin is not None:
            self.to_vmm += data

    def reset_client(self) -> None:
        """Forget the client after an unexpected error; the console stays open for the next."""
        self._drop_client()

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.to_client.clear()

    def close(self) -> None:
        self._drop_client()
        self.listener.close()
        if self.vmm_stdin is not None:
            os.close(self.vmm_stdin)
            self.vmm_stdin = None
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)  # ours still: nobody connects to a VM that is gone
        except OSError:
            pass


def enter_cgroup(procs: list[str], cgroupns: str | None) -> None:
    """Join the VM's host cgroup in every hierarchy (the files worker/hostcgroup.py created)
    before the VMM starts, so the VMM is born there and its memory is charged to it. With
    `cgroupns`, first enter that cgroup namespace (pid 1's): v2 refuses a move outside our own."""
    if cgroupns:
        import ctypes

        fd = os.open(cgroupns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, 0x02000000) != 0:  # CLONE_NEWCGROUP
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), cgroupns)
        finally:
            os.close(fd)
    for path in procs:
        with open(path, "w") as f:
            f.write(str(os.getpid()))


def enter_netns(name: str) -> None:
    """Join the network namespace `name` (an `ip netns` name), as `ip netns exec` would, so that
    taps open and the VMM runs there."""
    fd = os.open(name if name.startswith("/") else f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, CLONE_NEWNET)
        else:  # Python < 3.12
            import ctypes

            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), name)
    finally:
        os.close(fd)


def open_passed_fd(kind: str, arg: str) -> int:
    """Open, as root, what the VMM gets as a descriptor instead of opening it itself after it
    dropped its privileges (it has no right to the state directory, /dev/net/tun or the tap)."""
    if kind in ("read", "rdwr"):
        # non-blocking so that a FIFO swapped in cannot hang the open; only a regular file will do
        flags = (os.O_RDONLY if kind == "read" else os.O_RDWR) | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(arg, flags)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    if kind == "tap":
        # TUNSETIFF would create a missing tap, one on no bridge: it must exist already.
        socket.if_nametoindex(arg)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", arg.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError:
            os.close(fd)
            raise
        return fd
    if kind == "listen":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.lexists(arg):
                os.unlink(arg)
            sock.bind(arg)
            os.chmod(arg, 0o600)  # only root (the worker) talks to the VMM's control socket
            sock.listen(8)
        except OSError:
            sock.close()
            raise
        return sock.detach()
    raise ValueError(f"unknown descriptor kind {kind!r}")


def place_passed_fds(specs: list[str]) -> list[int]:
    """Open every `N=KIND:ARG` and move it to descriptor N; the numbers, for pass_fds."""
    opened = []
    for item in specs:
        number, _, rest = item.partition("=")
        kind, _, arg = rest.partition(":")
        try:
            fd = open_passed_fd(kind, arg)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot open {kind} {arg} for the VMM: {exc.strerror or exc}") from None
        target = int(number)
        if target != fd:
            if _in_use(target):
                os.close(fd)
                raise OSError(errno.EBUSY, f"descriptor {target} for {arg} is already in use")
            os.dup2(fd, target, inheritable=False)
            os.close(fd)
        opened.append(target)
    return opened


def _in_use(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _report(fd: int, payload: dict) -> None:
    """Tell the starter (the worker, through its fork server or a launcher) how the launch went.
    A starter that is gone (a worker killed mid-launch) is not the supervisor's failure: the state
    files (pid, run.json, exit.json) tell the next worker the same, so a broken pipe is ignored."""
    try:
        os.write(fd, json.dumps(payload).encode())
    except OSError:  # BrokenPipeError above all: nobody reads the report any more
        pass


def supervise(args: argparse.Namespace, report_fd: int) -> int:
    args.steps["supervisor"] = time.monotonic()
    state = args.state_dir
    log_path = os.path.join(state, "console.log")
    # The previous boot's log becomes the rotated generation; the new boot starts a fresh file.
    if os.path.exists(log_path):
        os.replace(log_path, log_path + ".1")
    log = RotatingLog(log_path, args.max_bytes)

    lease_path = os.path.join(node_dir(state), LEASE_FILE)
    lease = read_lease(lease_path)
    verdict, why = lease_verdict(lease, boottime(), armed=False)
    if verdict == "expired":
        _report(report_fd, {"error": f"not starting the VMM: this node's fence lease is not valid ({why})"})
        return 127
    late = boottime() - args.start_before if args.start_before is not None else 0.0
    if late > 0:
        # The start was decided under a lease that has run out since: the worker stalled (frozen,
        # suspended) between its decision and this launch, long enough for the VM to have been
        # rescheduled elsewhere. A lease renewed after the stall does not cover that decision.
        _report(report_fd, {"error": f"not starting the VMM: the start was decided under a fence "
                                     f"lease that ran out {late:.1f}s ago; deciding again"})
        return 127
    try:
        os.unlink(os.path.join(state, FENCE_FILE))  # the previous run's; this run is not fenced
    except FileNotFoundError:
        pass

    args.steps["lease_checked"] = time.monotonic()
    try:
        enter_cgroup(args.cgroup_procs, args.cgroupns)
    except OSError as exc:
        _report(report_fd, {"error": f"cannot join the VM's host cgroup: {exc}"})
        return 127

    try:
        if args.netns:
            try:
                enter_netns(args.netns)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot enter network namespace {args.netns}: {exc.strerror}") from None
        passed = place_passed_fds(args.fd)
    except OSError as exc:
        _report(report_fd, {"error": exc.strerror or str(exc)})
        return 127
    args.steps["fds_placed"] = time.monotonic()
    drop = {}
    if args.run_as:
        uid, _, gid = args.run_as.partition(":")
        # No supplementary group of root's survives: only the listed ones (e.g. /dev/kvm's).
        drop = {"user": int(uid), "group": int(gid),
                "extra_groups": [int(g) for g in args.groups.split(",") if g]}

    read_fd, write_fd = os.pipe()
    # The serial port's input: QEMU's `-serial stdio` and Firecracker's serial read stdin. The
    # supervisor keeps the write end and feeds it what the console socket's client types.
    serial_in, serial_feed = os.pipe()
    try:
        console = ConsoleRelay(os.path.join(state, CONSOLE_SOCKET), serial_feed)
    except OSError as exc:
        _report(report_fd, {"error": f"cannot create the console socket: {exc}"})
        return 127
    started_mono = time.monotonic()
    started_wall = time.time()
    started_boot = boottime()  # before the VMM exists: the journal never shows it starting late
    try:
        vmm = subprocess.Popen(args.argv, stdin=serial_in, stdout=write_fd, stderr=write_fd,
                               close_fds=True, pass_fds=passed, cwd=state,
                               env={k: os.environ[k] for k in VMM_ENV if k in os.environ}, **drop)
    except OSError as exc:
        console.close()
        _report(report_fd, {"error": f"cannot execute {args.argv[0]}: {exc}"})
        return 127
    os.close(write_fd)
    os.close(serial_in)
    for fd in passed:  # the VMM holds them now; a tap or socket must go when the VMM goes
        os.close(fd)

    write_atomic(os.path.join(state, "pid"), f"{vmm.pid}\n")
    run = {"pid": vmm.pid, "supervisor_pid": os.getpid(), "started_at": started_wall,
           "started_monotonic": started_mono, "argv": args.argv, "steps_monotonic": args.steps}
    write_atomic(os.path.join(state, "run.json"), json.dumps(run))
    journal(state, "start", pid=vmm.pid, supervisor_pid=os.getpid(), boottime=started_boot)
    # From here on the VMM runs and this process is all that drains its console and enforces its
    # fence, whether or not its starter is still there to read the report.
    _report(report_fd, run)
    os.close(report_fd)

    marker = args.ready_marker.encode() if args.ready_marker else b""
    seen_ready = not marker
    tail = b""
    fence = LeaseFence(state, vmm, armed=lease is not None)
    while True:
        fence.check()
        try:
            readable, writable, _ = select.select([read_fd, *console.readers()], console.writers(), [],
                                                  LEASE_CHECK_SECONDS)
        except InterruptedError:
            continue
        try:
            console.service(readable, writable)
        except Exception:  # noqa: BLE001 - the console's client never takes the supervisor down
            console.reset_client()
        if read_fd not in readable:
            continue
        try:
            chunk = os.read(read_fd, READ_SIZE)
        except InterruptedError:
            continue
        if not chunk:
            break  # every writer closed: the VMM has exited
        if not seen_ready:
            window = tail + chunk
            if marker in window:
                seen_ready = True
                write_atomic(os.path.join(state, "ready"),
                             json.dumps({"at": time.time(), "monotonic": time.monotonic()}))
            tail = window[-(len(marker) - 1):] if len(marker) > 1 else b""
        log.write(chunk)
        console.output(chunk)
    console.close()
    log.close()
    returncode = vmm.wait()
    journal(state, "stop", pid=vmm.pid, supervisor_pid=os.getpid(), returncode=returncode, fenced=fence.fenced)
    write_atomic(os.path.join(state, "exit.json"), json.dumps({"returncode": returncode, "at": time.time(),
                                                               "fenced": fence.fenced}))
    return 0


class LeaseFence:
    """The supervisor's half of the fence: stop the VMM once the node's lease has expired.

    Signals go from the supervise loop's own thread, before it reaps the VMM, so they can never
    reach a recycled pid."""

    def __init__(self, state: str, vmm: subprocess.Popen, armed: bool):
        self.state, self.vmm, self.armed = state, vmm, armed
        self.lease_path = os.path.join(node_dir(state), LEASE_FILE)
        self.fenced = False
        self.kill_at: float | None = None
        self.next_check = 0.0

    def check(self) -> None:
        now = boottime()
        if self.kill_at is not None:
            if now >= self.kill_at:
                self._signal(signal.SIGKILL)
                self.kill_at = None
            return
        if self.fenced or now < self.next_check:
            return
        self.next_check = now + LEASE_CHECK_SECONDS
        lease = read_lease(self.lease_path)
        verdict, why = lease_verdict(lease, now, self.armed)
        self.armed = self.armed or lease is not None
        if verdict != "expired":
            return
        self.fenced = True
        kill_after = (lease or {}).get("kill_after_seconds", DEFAULT_KILL_AFTER)
        if not isinstance(kill_after, (int, float)) or not 0 <= kill_after <= 300:
            kill_after = DEFAULT_KILL_AFTER
        record = {"reason": "LeaseExpired", "message": why, "at": time.time(), "boottime": now,
                  "pid": self.vmm.pid, "lease": lease}
        try:
            write_atomic(os.path.join(self.state, FENCE_FILE), json.dumps(record))
        except OSError:
            pass  # the VMM must stop whether or not the record can be written
        journal(self.state, "fence", pid=self.vmm.pid, supervisor_pid=os.getpid(), message=why)
        self._signal(signal.SIGTERM)
        self.kill_at = now + kill_after

    def _signal(self, sig: int) -> None:
        if self.vmm.returncode is None:
            try:
                os.kill(self.vmm.pid, sig)
            except ProcessLookupError:
                pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--max-bytes", type=int, default=1 << 20)
    parser.add_argument("--ready-marker", default="")
    parser.add_argument("--start-before", type=float, default=None, metavar="BOOTTIME",
                        help="refuse to start the VMM after this CLOCK_BOOTTIME (the lease the start was decided under)")
    parser.add_argument("--cgroup-procs", action="append", default=[],
                        help="a cgroup.procs file the supervisor joins before starting the VMM (repeatable)")
    parser.add_argument("--cgroupns", default=None, help="cgroup namespace to enter before joining")
    parser.add_argument("--netns", default=None, help="network namespace (`ip netns` name) to run the VMM in")
    parser.add_argument("--run-as", default=None, metavar="UID:GID", help="start the VMM as this uid and gid")
    parser.add_argument("--groups", default="", help="the VMM's supplementary groups with --run-as (comma-separated)")
    parser.add_argument("--fd", action="append", default=[], metavar="N=KIND:ARG",
                        help="open ARG as root and hand it to the VMM as descriptor N; KIND: read, rdwr, "
                             "tap (a tap's name) or listen (a unix socket's path) (repeatable)")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


PARSER = _parser()
"""Built once, when the module is imported, and used once then (which fills argparse's caches):
the fork server's launchers are forked with it ready, so a launch does not build it on the way to
the VMM's exec (2 ms of a launch before, under 1 ms after)."""
PARSER.parse_args(["--state-dir", ".", "--", "true"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = PARSER
    args = parser.parse_args(argv)
    if args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error("no VMM command given")
    return args


def _launch_args(argv: list[str] | None):
    steps = {"launcher": time.monotonic()}
    args = parse_args(argv)
    # CLOCK_MONOTONIC (system-wide) times of the launch's steps, kept in run.json for the
    # worker's step timings (worker/timing.py)
    args.steps = steps
    return args


def _supervise_detached(args, report_w: int) -> int:
    """`supervise` with nothing of its starter's left on descriptors 0-2 (or the starter would wait
    for an end that never comes) and deaf to a hang-up or a Ctrl-C aimed at whoever started it, so
    the VM outlives both; a failure is left where the worker looks."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return supervise(args, report_w)
    except BaseException:  # noqa: BLE001 - last resort: leave the reason where the worker looks
        try:
            write_atomic(os.path.join(args.state_dir, "exit.json"),
                         json.dumps({"returncode": None, "supervisor_error": traceback.format_exc()}))
        except OSError:
            pass
        return 1


def main(argv: list[str] | None = None) -> int:
    args = _launch_args(argv)
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        code = 1
        try:
            code = _supervise_detached(args, report_w)
        finally:
            os._exit(code)

    os.close(report_w)
    chunks = []
    while True:
        data = os.read(report_r, READ_SIZE)
        if not data:
            break
        chunks.append(data)
    report = b"".join(chunks).decode() or json.dumps({"error": "supervisor exited before starting the VMM"})
    sys.stdout.write(report + "\n")
    sys.stdout.flush()
    return 0 if '"pid"' in report else 1


def supervise_in_place(argv: list[str]) -> int:
    """Be the supervisor in this process, without a launcher forking it: for a process that is
    detached already (a staged child of the worker's fork server, in a session of its own). The
    report goes to stdout, which is the only descriptor left on it afterwards, so whoever reads it
    sees its end once the VMM runs (or why not); the VMM's exit ends this process."""
    args = _launch_args(argv)
    return _supervise_detached(args, os.dup(1))


if __name__ == "__main__":
    sys.exit(main())
