"""The VMM driver interface and what every driver shares: the spec, the state directory, launching
detached, adopting, waiting for readiness and stopping.

A VM's state directory (`/var/lib/mikrom/vms/<uid>/` on a node) holds everything needed to find,
stop or start it again without the worker's memory:

  vm.json      driver name, driver settings and the VMSpec: enough to start the VM again
  pid          the VMM's pid; `running_pid` trusts it only if /proc/<pid>/cmdline names this VM
  run.json     pids and start time, written by the supervisor (see consolecap.py)
  ready        when the guest printed the ready marker
  exit.json    the VMM's exit status, once it exited
  sandbox.json the uid/gid the VM's VMM runs as (sandbox.py), kept for every later start
  console.log  the serial console (with console.log.1, capped at `console_max_bytes` together)

Drivers subclass `Driver` and provide `command()` (the VMM's argv), `available()`, and optionally
`launch_plan()` (descriptors and the uid the supervisor hands the VMM), `_configure()` (after
launch, e.g. Firecracker's API calls) and `_graceful_stop()`. `launch_detached()` is the one place
that starts a supervisor.

Every wait here has a deadline and sleeps in `time.sleep` or `select` (gevent's under the worker's
monkey-patching, so nothing blocks the hub); the wait for the ready marker wakes on inotify.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import hostcgroup, timing
from . import consolecap, forkserver, sandbox
from .sandbox import SandboxConfig, VMIds

log = logging.getLogger(__name__)

READY_MARKER = "MIKROM-READY"
"""The line a guest prints on its console when it is up (our test image's /init does)."""

POLL_INTERVAL = 0.05
LAUNCH_TIMEOUT = 30.0
FIRST_PASSED_FD = 100
"""Descriptors handed to a VMM are numbered from here, clear of the supervisor's own."""


class VMMError(Exception):
    """Base of VMM errors; `reason` is the CamelCase reason for the MicroVM's conditions."""

    reason = "VMMError"


class VMMStartFailed(VMMError):
    """The VMM could not be launched or configured; nothing is left running."""

    reason = "VMMStartFailed"


class BootTimeout(VMMError):
    """The guest did not print the ready marker in time; the VMM is still running."""

    reason = "BootTimeout"


class VMMExited(VMMError):
    """The VMM process is gone (crash, guest power-off or panic)."""

    reason = "VMMExited"


class StopFailed(VMMError):
    """The VMM survived SIGKILL for longer than expected (uninterruptible sleep)."""

    reason = "StopFailed"


@dataclass
class VMSpec:
    """What a driver needs to boot one VM. Paths are host paths, already resolved and checked."""

    uid: str
    name: str
    vcpus: int
    memory_mib: int
    kernel: str
    initrd: str | None = None
    rootfs: str | None = None
    kernel_args: str = ""
    tap: str | None = None
    mac: str | None = None
    state_dir: Path = Path(".")
    netns: str | None = None
    """Run the VMM inside this network namespace (`ip netns exec`); the tap must live there."""
    start_before: float | None = None
    """CLOCK_BOOTTIME deadline of the node's lease when the start was decided (worker/lease.py
    `deadline`): the supervisor refuses to start the VMM after it, even if the lease was renewed
    since, because the decision may be older than a reschedule elsewhere (a worker frozen between
    its Provisioning write and the launch). None: no lease (a driver used without a worker)."""

    def __post_init__(self):
        self.state_dir = Path(self.state_dir)
        if not self.uid:
            raise ValueError("VMSpec.uid is empty")
        if self.vcpus < 1 or self.memory_mib < 1:
            raise ValueError(f"VMSpec needs vcpus >= 1 and memory_mib >= 1, got {self.vcpus}, {self.memory_mib}")
        if self.tap is not None and len(self.tap) > 15:
            raise ValueError(f"tap name {self.tap!r} is longer than 15 characters")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["state_dir"] = str(self.state_dir)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VMSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LaunchPlan:
    """How the supervisor starts one VMM: its argv, the network namespace it enters first, the
    descriptors it opens as root and hands over, and the uid/gid it drops to (None: root)."""

    argv: list[str]
    netns: str | None = None
    fds: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    """(descriptor number in the VMM, kind, argument): `read` or `rdwr` a file, `tap` attach the
    named tap, `listen` a unix socket bound at the path (see consolecap.open_passed_fd)."""
    run_as: VMIds | None = None
    groups: list[int] = dataclasses.field(default_factory=list)
    """The VMM's only supplementary groups when it runs as `run_as`."""

    def pass_fd(self, kind: str, arg: str) -> int:
        """Hand the VMM a descriptor opened by the supervisor; returns its number in the VMM."""
        number = FIRST_PASSED_FD + len(self.fds)
        self.fds.append((number, kind, str(arg)))
        return number

    def supervisor_args(self) -> list[str]:
        args = ["--netns", self.netns] if self.netns else []
        if self.run_as:
            args += ["--run-as", f"{self.run_as.uid}:{self.run_as.gid}", "--groups", ",".join(map(str, self.groups))]
        for number, kind, arg in self.fds:
            args += ["--fd", f"{number}={kind}:{arg}"]
        return args


_fork_server: forkserver.ForkServer | None = None
_fork_server_lock = threading.Lock()


def fork_server() -> forkserver.ForkServer:
    """This process's fork server for supervisors (started on first use; see forkserver.py)."""
    global _fork_server
    with _fork_server_lock:
        if _fork_server is None:
            _fork_server = forkserver.ForkServer(env=sandbox.vmm_environment())
        return _fork_server


def prestart_fork_server() -> None:
    """Start the fork server now (the worker does at start), so no create waits for it."""
    server = fork_server()
    with server._lock:
        server._ensure()


def launch_detached(plan: LaunchPlan, state: Path, supervisor_args: list[str],
                    staged: forkserver.Staged | None = None) -> int:
    """Start the supervisor (consolecap.py) that starts the VMM of `plan`, detached from the
    caller, with a clean environment (nothing of the worker's: it holds credentials); return the
    VMM's pid once it runs. `supervisor_args` are further supervisor options (console, cgroup).

    The supervisor is forked by the fork server (forkserver.py), which has consolecap imported
    already; only if that server cannot be reached does a launcher process of its own start it.
    With `staged` (Driver.stage), the launcher forked ahead by that server, already in the VM's
    host cgroup, takes the launch."""
    args = ["--state-dir", str(state), *supervisor_args, *plan.supervisor_args(), "--", *plan.argv]
    try:
        if staged is not None:
            out = staged.launch(args, timeout=LAUNCH_TIMEOUT)
        else:
            out = fork_server().launch(args, str(state), timeout=LAUNCH_TIMEOUT)
        stderr = ""
        if out is None:
            log.warning("the supervisor fork server is unavailable; launching %s with a process of its own",
                        plan.argv[0])
            res = subprocess.run([sys.executable, "-I", "-S", consolecap.__file__, *args], check=False,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                                 start_new_session=True, cwd=state, env=sandbox.vmm_environment())
            out, stderr = res.stdout, f"launcher exited {res.returncode}: {res.stderr.strip()[-2000:]}"
    except (subprocess.TimeoutExpired, TimeoutError) as exc:
        raise VMMStartFailed(f"launching {plan.argv[0]} took longer than {LAUNCH_TIMEOUT}s") from exc
    report = None
    for line in reversed(out.strip().splitlines()):
        try:
            report = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(report, dict):
        report = {"error": stderr or f"the launcher gave no report: {out.strip()[-2000:]}"}
    if "pid" not in report:
        raise VMMStartFailed(report.get("error", "unknown launch failure"))
    return int(report["pid"])


def is_supervisor(pid: int, state: Path) -> bool:
    """Whether `pid` is the supervisor of the VM in `state` (never a recycled pid): its working
    directory is the state dir and it runs consolecap, directly or forked by the fork server."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    cmdline = _cmdline(pid)
    return cwd == str(state) and ("consolecap" in cmdline or "forkserver" in cmdline)


def supervised(state_dir: str | os.PathLike, pid: int, run: dict) -> bool:
    """Whether the running VMM `pid` of the VM in `state_dir` still has its supervisor, the one
    process that drains its console and enforces its fence: `run` (the state dir's run.json, as
    the caller read it) names the supervisor of the run of `pid`. A run.json of another run counts
    as supervised: the launch is between its pid file and its run.json, which its supervisor is
    writing."""
    state = Path(state_dir).resolve()
    if run.get("pid") != pid:
        return True
    sup = run.get("supervisor_pid")
    return isinstance(sup, int) and is_supervisor(sup, state)


def merge_kernel_args(defaults: list[str], user: str) -> str:
    """The user's kernel arguments plus each default whose key (the part before `=`) the user did
    not set, defaults first: the user's `panic=1` wins over a default `panic=-1`, and a repeated
    `console=` never registers the same console twice."""
    user_words = user.split()
    user_keys = {w.split("=", 1)[0] for w in user_words}
    return " ".join([d for d in defaults if d.split("=", 1)[0] not in user_keys] + user_words)


def kvm_status() -> tuple[bool, str]:
    """Whether /dev/kvm can run stock guest kernels, and why not if it cannot.

    /dev/kvm existing is not enough: `kvm_pvm` (a nested, software layer) exposes /dev/kvm but
    boots only specially built guest kernels, and a stock kernel hangs under it.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable by this user"
    if os.path.isdir("/sys/module/kvm_pvm"):
        return False, "/dev/kvm is provided by kvm_pvm, which boots only specially built guest kernels"
    if not (os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd")):
        return False, "neither kvm_intel nor kvm_amd is loaded"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"cannot open /dev/kvm: {exc}"
    try:
        version = fcntl.ioctl(fd, 0xAE00)  # KVM_GET_API_VERSION
    except OSError as exc:
        return False, f"KVM_GET_API_VERSION failed: {exc}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"unexpected KVM API version {version}"
    return True, "KVM is usable"


def write_atomic(path: Path, text: str) -> None:
    consolecap.write_atomic(str(path), text)


def write_replaced(path: Path, text: str) -> None:
    """Like write_atomic (readers see the old file or the new one), but without the fsync, which
    `sync_file` does later, off a start's critical path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _proc_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie's /proc/<pid>/cmdline is empty anyway)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running_pid(state_dir: str | os.PathLike) -> int | None:
    """The pid of the VMM that belongs to this state dir, if it is running.

    The pid file alone could name a recycled pid, so the process must also carry this VM's state
    directory or uid on its command line (QEMU's QMP socket path, Firecracker's API socket path,
    or the jailer's `--id`).
    """
    state_dir = Path(state_dir)
    try:
        pid = int((state_dir / "pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1 or not _proc_alive(pid):
        return None
    cmdline = _cmdline(pid)
    saved = _read_json(state_dir / "vm.json") or {}
    uid = saved.get("spec", {}).get("uid")
    if str(state_dir.resolve()) + "/" in cmdline or (uid and uid in cmdline):
        return pid
    return None


def console_tail(state_dir: str | os.PathLike, max_bytes: int = 4096) -> str:
    """The last `max_bytes` of the console (across the rotation), for error messages."""
    state_dir = Path(state_dir)
    data = b""
    for name in ("console.log", "console.log.1"):
        try:
            with open(state_dir / name, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                want = max_bytes - len(data)
                f.seek(max(0, size - want))
                data = f.read(want) + data
        except OSError:
            continue
        if len(data) >= max_bytes:
            break
    return data.decode(errors="replace").replace("\r\n", "\n")


IN_CREATE, IN_MOVED_TO = 0x100, 0x80
LIVENESS_INTERVAL = 0.25
"""How often a wait for the ready marker also checks that the VMM still runs."""


class DirWatch:
    """Wakes a waiter as soon as a file is created or renamed into a directory (inotify), with a
    timeout. Where inotify is unavailable it sleeps POLL_INTERVAL instead, so callers poll."""

    def __init__(self, path: Path):
        self.fd = -1
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd >= 0:
                if libc.inotify_add_watch(fd, os.fsencode(str(path)), IN_CREATE | IN_MOVED_TO) >= 0:
                    self.fd = fd
                else:
                    os.close(fd)
        except (OSError, AttributeError):
            pass

    def wait(self, timeout: float) -> None:
        if self.fd < 0:
            time.sleep(min(timeout, POLL_INTERVAL))
            return
        # select is gevent's under the worker: only this greenlet waits
        if select.select([self.fd], [], [], max(0.0, timeout))[0]:
            try:
                while os.read(self.fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DirWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _proc_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


class Driver:
    """One VMM flavour. Subclasses set `name` and implement `available()` and `command()`."""

    name = "base"

    def __init__(self, console_max_bytes: int = 1 << 20, ready_marker: str = READY_MARKER,
                 host_cgroup: dict | None = None, sandbox: SandboxConfig | dict | None = None):
        self.console_max_bytes = int(console_max_bytes)
        self.ready_marker = ready_marker
        # the VMM's uid range and confinement (sandbox.py)
        self.sandbox = SandboxConfig.from_dict(sandbox)
        # the VMM's own cgroup under the host's root (hostcgroup.py); None: the worker's cgroup
        self.host_cgroup = hostcgroup.HostCgroupConfig.from_dict(host_cgroup)

    # --- for subclasses -------------------------------------------------------------------------
    def available(self) -> bool:
        raise NotImplementedError

    def command(self, spec: VMSpec) -> list[str]:
        """The VMM's argv; must contain the state dir or the uid (see running_pid)."""
        raise NotImplementedError

    def launch_plan(self, spec: VMSpec) -> LaunchPlan:
        """How the supervisor starts the VMM; by default `command()` as root in the VM's netns."""
        return LaunchPlan(argv=self.command(spec), netns=spec.netns)

    def vm_ids(self, state_dir: str | os.PathLike) -> VMIds | None:
        """The uid/gid this VM's VMM runs as (claimed on first use, recorded in its state dir);
        None when the VMM runs as root."""
        return None

    def config(self) -> dict:
        """Driver settings saved in vm.json so a restart uses the same ones."""
        return {"console_max_bytes": self.console_max_bytes, "ready_marker": self.ready_marker,
                "host_cgroup": self.host_cgroup.to_dict() if self.host_cgroup else None,
                "sandbox": self.sandbox.to_dict()}

    def _prepare(self, spec: VMSpec) -> None:
        """Before launch: remove stale sockets and the like."""

    def _configure(self, spec: VMSpec, pid: int) -> None:
        """After launch: e.g. Firecracker's API calls. Raise to abort the start."""

    def _graceful_stop(self, state_dir: Path, timeout: float) -> None:
        """Ask the guest to shut down; may raise, the caller then kills."""

    def _cleanup(self, state_dir: Path) -> None:
        """After the VMM is gone: sockets, jailer leftovers."""

    # --- shared ---------------------------------------------------------------------------------
    def running_pid(self, state_dir: str | os.PathLike) -> int | None:
        return running_pid(state_dir)

    def stage(self, state_dir: str | os.PathLike, uid: str, vcpus: int, memory_mib: int) -> forkserver.Staged | None:
        """A launcher for this VM forked ahead of its start, that joins the VM's host cgroup
        (created here if it is not yet) while the caller prepares the rest (forkserver.py): for
        `start(spec, staged=...)`, or to be closed. None without a host cgroup or fork server."""
        if not self.host_cgroup:
            return None
        try:
            placement = hostcgroup.made(self.host_cgroup, uid, vcpus, memory_mib) \
                or hostcgroup.create(self.host_cgroup, uid, vcpus, memory_mib)
        except hostcgroup.HostCgroupError as exc:
            raise VMMStartFailed(str(exc)) from exc
        namespace = hostcgroup.foreign_cgroup_namespace(self.host_cgroup.namespace)
        return fork_server().stage(str(Path(state_dir).resolve()), [str(p) for p in placement.procs], namespace)

    def start(self, spec: VMSpec, staged: forkserver.Staged | None = None) -> int:
        """Launch the VMM detached and return its pid; if this VM already runs, return its pid.
        `staged` (from `stage`, for the same VM and shape) takes the launch; it is closed in any
        case."""
        try:
            return self._start(spec, staged)
        finally:
            if staged is not None:
                staged.close()

    def _start(self, spec: VMSpec, staged: forkserver.Staged | None) -> int:
        state = spec.state_dir = Path(spec.state_dir).resolve()
        existing = running_pid(state)
        if existing:
            return existing
        for path, what in ((spec.kernel, "kernel"), (spec.initrd, "initrd"), (spec.rootfs, "rootfs")):
            if path and not os.path.isfile(path):
                raise VMMStartFailed(f"{what} {path} does not exist")
        if spec.rootfs and Path(spec.rootfs).resolve().parent != state:
            # The VMM writes its disk (and a jail hands it to the VM's uid): never a shared image.
            raise VMMStartFailed(f"rootfs {spec.rootfs} is not the VM's own copy in {state}")
        state.mkdir(parents=True, exist_ok=True)
        # synced once the VMM runs: until then a crash loses nothing that the next start does not
        # write again
        write_replaced(state / "vm.json", json.dumps(
            {"driver": self.name, "driver_config": self.config(), "spec": spec.to_dict()}, indent=2))
        for stale in ("pid", "run.json", "ready", "exit.json"):
            (state / stale).unlink(missing_ok=True)
        timing.mark("vm_json")
        try:
            self._prepare(spec)
            plan = self.launch_plan(spec)
        except sandbox.SandboxUnavailable as exc:
            raise VMMStartFailed(str(exc)) from exc
        timing.mark("launch_plan")
        try:
            # The supervisor joins the VM's host cgroup before it starts the VMM (a staged
            # launcher has joined it already, and the supervisor it forks is born there).
            cgroup_args = hostcgroup.supervisor_args(self.host_cgroup, spec.uid, spec.vcpus, spec.memory_mib) \
                if self.host_cgroup and staged is None else []
        except hostcgroup.HostCgroupError as exc:
            raise VMMStartFailed(str(exc)) from exc
        timing.mark("host_cgroup")
        decided = ["--start-before", repr(spec.start_before)] if spec.start_before is not None else []
        pid = launch_detached(plan, state, ["--max-bytes", str(self.console_max_bytes),
                                            "--ready-marker", self.ready_marker, *decided, *cgroup_args],
                              staged=staged)
        sync_file(state / "vm.json")
        try:
            self._configure(spec, pid)
        except BaseException as exc:
            self._kill(state, pid)
            if isinstance(exc, VMMError):
                raise
            raise VMMStartFailed(f"configuring {self.name} failed: {exc}") from exc
        log.info("started %s for %s (pid %d)", self.name, spec.uid, pid)
        return pid

    def wait_ready(self, spec: VMSpec, timeout: float) -> float:
        """Seconds from the VMM's start to the ready marker on its console.

        Raises VMMExited if the VMM dies first, BootTimeout after `timeout` seconds (the VMM keeps
        running; the caller decides whether to stop it). Both messages end with the console tail.
        The supervisor's `ready` (or `exit.json`) appearing wakes the wait at once (inotify on the
        state dir); the VMM's liveness is looked at every LIVENESS_INTERVAL besides.
        """
        state = Path(spec.state_dir).resolve()
        deadline = time.monotonic() + timeout
        with DirWatch(state) as watch:
            while True:
                ready = _read_json(state / "ready")
                if ready:
                    run = _read_json(state / "run.json") or {}
                    return max(0.0, ready["monotonic"] - run.get("started_monotonic", ready["monotonic"]))
                if running_pid(state) is None:
                    # The marker may have landed just before the VMM exited: look once more.
                    if _read_json(state / "ready"):
                        continue
                    # The supervisor records the exit status just after reaping, once it has read
                    # the console to its end; give it a moment, then look for the marker once more.
                    settle = time.monotonic() + 1.0
                    while not (state / "exit.json").exists() and time.monotonic() < settle:
                        watch.wait(settle - time.monotonic())
                    if _read_json(state / "ready"):
                        continue
                    exit_info = _read_json(state / "exit.json") or {}
                    raise VMMExited(f"{self.name} for {spec.uid} exited (status {exit_info.get('returncode')}) "
                                    f"before the guest was ready; console:\n{console_tail(state)}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BootTimeout(f"{spec.uid} printed no {self.ready_marker} within {timeout:.0f}s; "
                                      f"console:\n{console_tail(state)}")
                watch.wait(min(remaining, LIVENESS_INTERVAL))

    def stop(self, state_dir: str | os.PathLike, timeout: float = 30.0) -> None:
        """Stop the VM: ask the guest to power off, kill it after `timeout` seconds. Stopping a VM
        that is not running is fine."""
        state = Path(state_dir).resolve()
        pid = running_pid(state)
        if pid is None:
            self._finish_stop(state)
            return
        if timeout > 0:
            try:
                self._graceful_stop(state, min(timeout, 5.0))
            except Exception as exc:  # noqa: BLE001 - a failed polite request just means we kill
                log.warning("graceful stop of %s failed (%s); killing it after the timeout", state, exc)
            if _wait_gone(pid, timeout):
                self._finish_stop(state)
                return
            log.warning("%s did not stop within %.0fs; killing pid %d", state, timeout, pid)
        self._kill(state, pid)
        self._finish_stop(state)

    def _kill(self, state: Path, pid: int) -> None:
        # Re-check identity right before the signal: never kill a recycled pid.
        if running_pid(state) != pid:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
        if not _wait_gone(pid, 10.0):
            raise StopFailed(f"pid {pid} survived SIGKILL for 10s")

    def _finish_stop(self, state: Path) -> None:
        # Let the supervisor drain the last console bytes and record the exit status.
        run = _read_json(state / "run.json") or {}
        sup = run.get("supervisor_pid")
        if sup and is_supervisor(int(sup), state):
            _wait_gone(int(sup), 5.0)
        (state / "pid").unlink(missing_ok=True)
        self._cleanup(state)
        if self.host_cgroup:
            saved = _read_json(state / "vm.json") or {}
            uid = saved.get("spec", {}).get("uid")
            if uid:
                hostcgroup.remove(self.host_cgroup, uid)


def load_saved(state_dir: str | os.PathLike) -> tuple[str, dict, VMSpec]:
    """(driver name, driver settings, VMSpec) from a state dir's vm.json."""
    state = Path(state_dir)
    saved = _read_json(state / "vm.json")
    if not saved or "spec" not in saved:
        raise VMMError(f"{state}/vm.json is missing or unreadable")
    spec = VMSpec.from_dict(saved["spec"])
    spec.state_dir = state.resolve()
    return saved["driver"], saved.get("driver_config", {}), spec
