"""Firecracker driver: start the process, configure it over its API socket, boot.

The API is HTTP/1.1 over a unix socket (spec: Firecracker's firecracker-api yaml, a copy of which
the tests validate every request against). `build_requests` is the whole configuration as data;
`start` sends it in order, ending with `InstanceStart`. A graceful stop is the `SendCtrlAltDel`
action (the guest sees Ctrl-Alt-Del on its i8042 and reboots, which ends Firecracker); the base
driver kills after the timeout. The guest's serial port is Firecracker's stdin and stdout (the
jailer, not daemonized, keeps them): the supervisor's pipes, as for QEMU (consolecap.py).

With a `JailerConfig` the VMM runs through Firecracker's `jailer` (chroot, dropped uid/gid,
cgroup v2) as its VM's own uid and gid from the sandbox range (sandbox.py). Each file is named
inside the chroot by its role (`/kernel`, `/initrd`, `/rootfs`), never by its source's name, so
no two can collide. Kernel and initrd are shared images: they are never chowned or opened
writable, only hard-linked or copied read-only into the jail (sandbox.stage_shared); the VM's
own rootfs copy is the one file handed to the VM's uid. The tap must be owned by that uid
(netdev.ensure_tap(user=...)). Unjailed, Firecracker runs as root.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import hostcgroup
from . import sandbox
from .base import Driver, LaunchPlan, VMMStartFailed, VMSpec, kvm_status, load_saved, merge_kernel_args
from .sandbox import VMIds

API_SOCKET = "fc.sock"
JAIL_API_SOCKET = "/run/firecracker.socket"
BASE_KERNEL_ARGS = ["console=ttyS0", "reboot=k", "panic=1", "pci=off", "i8042.noaux", "i8042.nomux",
                    "i8042.nopnp", "i8042.dumbkbd"]
MEMORY_HEADROOM_MIB = 64  # Firecracker's own memory beside the guest's (documented as under 5 MiB)
CPU_PERIOD_US = 100_000
UNIX_PATH_MAX = 108  # sun_path, including its terminating NUL
_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what firecracker --id and jailer --id accept
JAIL_FILES = ("kernel", "initrd", "rootfs")
"""The names of the VM's files inside the jail: their roles."""


@dataclass
class JailerConfig:
    """Run Firecracker through `jailer`, each VM as its own uid/gid (the driver's sandbox range)."""

    binary: str = "jailer"
    """The jailer executable."""
    chroot_base: str = "/srv/jailer"
    """Jails live in <chroot_base>/<firecracker exec name>/<uid>/root."""
    cgroup_version: int = 2
    """cgroup hierarchy the jailer places the VMM in."""
    cgroup_limits: bool = True
    """Cap the VMM's cgroup at the VM's shape: `cpu.max` of its vCPUs and `memory.max` of its
    memory plus MEMORY_HEADROOM_MIB for Firecracker itself (cgroup v2 only)."""


def _hard_link(src: str, dest: Path) -> bool:
    """Link `dest` to `src`; False when they are on different filesystems (or linking fails)."""
    try:
        os.link(src, dest)
    except OSError:
        return False
    return True


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket, with the connection's timeout on connect and every read."""

    def __init__(self, sock_path: str | os.PathLike, timeout: float = 5.0):
        super().__init__("localhost", timeout=timeout)
        self.sock_path = str(sock_path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        dir_fd = None
        try:
            path = self.sock_path
            if len(os.fsencode(path)) >= UNIX_PATH_MAX:
                # A jail under a deep chroot base: reach the socket through its directory's fd.
                dir_fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
                path = f"/proc/self/fd/{dir_fd}/{os.path.basename(path)}"
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        self.sock = sock


class FirecrackerAPIError(VMMStartFailed):
    """Firecracker refused a request (its `fault_message` is in the text)."""


def api_request(sock_path: str | os.PathLike, method: str, path: str, body: dict | None = None,
                timeout: float = 5.0) -> tuple[int, str]:
    """One API call; returns (HTTP status, response text)."""
    conn = UnixHTTPConnection(sock_path, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def send_requests(sock_path: str | os.PathLike, requests: list[tuple[str, str, dict]],
                  timeout: float = 5.0) -> None:
    """Send API calls in order; the first one Firecracker refuses raises FirecrackerAPIError."""
    for method, path, body in requests:
        status, text = api_request(sock_path, method, path, body, timeout=timeout)
        if not 200 <= status < 300:
            raise FirecrackerAPIError(f"{method} {path} answered {status}: {text.strip()}")


def build_requests(spec: VMSpec) -> list[tuple[str, str, dict]]:
    """The API calls that configure and boot `spec`, in order: (method, path, JSON body)."""
    boot = {"kernel_image_path": spec.kernel, "boot_args": merge_kernel_args(BASE_KERNEL_ARGS, spec.kernel_args)}
    if spec.initrd:
        boot["initrd_path"] = spec.initrd
    requests = [
        ("PUT", "/boot-source", boot),
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mib, "smt": False}),
    ]
    if spec.rootfs:
        requests.append(("PUT", "/drives/rootfs", {
            "drive_id": "rootfs", "path_on_host": spec.rootfs, "is_root_device": True, "is_read_only": False}))
    if spec.tap:
        iface = {"iface_id": "eth0", "host_dev_name": spec.tap}
        if spec.mac:
            iface["guest_mac"] = spec.mac
        requests.append(("PUT", "/network-interfaces/eth0", iface))
    requests.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    return requests


class FirecrackerDriver(Driver):
    name = "firecracker"

    def __init__(self, binary: str = "firecracker", jailer: JailerConfig | dict | None = None,
                 api_timeout: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.binary = binary
        if isinstance(jailer, dict):
            # vm.json of an older worker may still name one uid/gid for every jail: ignored
            known = {f.name for f in dataclasses.fields(JailerConfig)}
            jailer = JailerConfig(**{k: v for k, v in jailer.items() if k in known})
        self.jailer = jailer
        self.api_timeout = api_timeout

    def config(self) -> dict:
        return {**super().config(), "binary": self.binary, "api_timeout": self.api_timeout,
                "jailer": dataclasses.asdict(self.jailer) if self.jailer else None}

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def unavailable_reason(self) -> str | None:
        """Why this driver cannot boot VMs here, or None."""
        if not shutil.which(self.binary):
            return f"no {self.binary} binary on PATH"
        if self.jailer and not shutil.which(self.jailer.binary):
            return f"no {self.jailer.binary} binary on PATH"
        ok, why = kvm_status()
        return None if ok else why

    # --- paths ----------------------------------------------------------------------------------
    def _jail_root(self, spec: VMSpec) -> Path:
        exec_name = os.path.basename(shutil.which(self.binary) or self.binary)
        return Path(self.jailer.chroot_base) / exec_name / spec.uid / "root"

    def api_socket(self, spec: VMSpec) -> Path:
        if self.jailer:
            return self._jail_root(spec) / JAIL_API_SOCKET.lstrip("/")
        return Path(spec.state_dir).resolve() / API_SOCKET

    # --- Driver hooks ---------------------------------------------------------------------------
    def vm_ids(self, state_dir: str | os.PathLike) -> VMIds | None:
        return sandbox.claim_ids(state_dir, self.sandbox) if self.jailer else None

    def launch_plan(self, spec: VMSpec) -> LaunchPlan:
        # The jailer joins the namespace itself (--netns), and drops to the VM's uid itself.
        return LaunchPlan(argv=self.command(spec), netns=None if self.jailer else spec.netns)

    def command(self, spec: VMSpec) -> list[str]:
        if not self.jailer:
            argv = [self.binary, "--api-sock", str(self.api_socket(spec))]
            if _ID.match(spec.uid):
                argv += ["--id", spec.uid]
            return argv
        if not _ID.match(spec.uid):
            raise VMMStartFailed(f"uid {spec.uid!r} is not a valid jailer id")
        j = self.jailer
        ids = self.vm_ids(spec.state_dir)
        argv = [j.binary, "--id", spec.uid, "--exec-file", shutil.which(self.binary) or self.binary,
                "--uid", str(ids.uid), "--gid", str(ids.gid), "--chroot-base-dir", j.chroot_base,
                "--cgroup-version", str(j.cgroup_version)]
        if self.host_cgroup:
            # The jailer's cgroup is the VM's host cgroup, <parent>/<uid>, which the supervisor
            # already joined; it finds the hierarchies in /proc/mounts, so in a pod the host's
            # cgroup root must be mounted at /sys/fs/cgroup (the chart does).
            version = hostcgroup.host_version(self.host_cgroup.root)
            argv[argv.index("--cgroup-version") + 1] = str(version)
            argv += ["--parent-cgroup", self.host_cgroup.parent]
            if j.cgroup_limits:
                argv += hostcgroup.jailer_cgroup_args(version, spec.vcpus, spec.memory_mib,
                                                      self.host_cgroup.memory_overhead_mib)
        elif j.cgroup_limits and j.cgroup_version == 2:
            argv += ["--cgroup", f"cpu.max={spec.vcpus * CPU_PERIOD_US} {CPU_PERIOD_US}",
                     "--cgroup", f"memory.max={(spec.memory_mib + MEMORY_HEADROOM_MIB) << 20}"]
        if spec.netns:
            argv += ["--netns", f"/var/run/netns/{spec.netns}"]
        return argv + ["--", "--api-sock", JAIL_API_SOCKET]

    def _prepare(self, spec: VMSpec) -> None:
        self.api_socket(spec).unlink(missing_ok=True)
        if self.jailer:
            self._populate_jail(spec)

    def _populate_jail(self, spec: VMSpec) -> None:
        """Put the VM's files in a fresh chroot, each named by its role. Kernel and initrd are
        shared images, staged read-only and root's (sandbox.stage_shared). The rootfs is the VM's
        own copy (base.start checked it lies in the state dir): hard-linked, so the guest's writes
        land in the state dir, and handed to the VM's uid, the only file that is."""
        ids = self.vm_ids(spec.state_dir)
        root = self._jail_root(spec)
        # A jail left by a crash belongs to the VM's uid (the jailer chowns it): whatever the VMM
        # planted there (a symlink where a file goes) must not be followed. No VMM runs now.
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        # Firecracker, already unprivileged, binds its API socket here.
        (root / "run").mkdir()
        os.chown(root / "run", ids.uid, ids.gid)
        for role in ("kernel", "initrd"):
            if getattr(spec, role):
                sandbox.stage_shared(getattr(spec, role), root / role, ids.gid)
        if spec.rootfs:
            dest = root / "rootfs"
            if not _hard_link(spec.rootfs, dest):
                subprocess.run(["cp", "--reflink=auto", "--sparse=always", "--", spec.rootfs, str(dest)],
                               check=True, timeout=600, stdin=subprocess.DEVNULL)
            os.chown(dest, ids.uid, ids.gid, follow_symlinks=False)
            os.chmod(dest, 0o600)

    def _jailed_spec(self, spec: VMSpec) -> VMSpec:
        def inside(role: str) -> str | None:
            return f"/{role}" if getattr(spec, role) else None
        return dataclasses.replace(spec, **{role: inside(role) for role in JAIL_FILES})

    def _configure(self, spec: VMSpec, pid: int) -> None:
        sock = self.api_socket(spec)
        deadline = time.monotonic() + self.api_timeout
        while not sock.exists():
            if self.running_pid(spec.state_dir) is None:
                raise VMMStartFailed("firecracker exited before opening its API socket")
            if time.monotonic() >= deadline:
                raise VMMStartFailed(f"firecracker did not create {sock} within {self.api_timeout}s")
            time.sleep(0.02)
        send_requests(sock, build_requests(self._jailed_spec(spec) if self.jailer else spec), self.api_timeout)

    def _graceful_stop(self, state_dir: Path, timeout: float) -> None:
        _, _, spec = load_saved(state_dir)
        send_requests(self.api_socket(spec), [("PUT", "/actions", {"action_type": "SendCtrlAltDel"})], timeout)

    def _cleanup(self, state_dir: Path) -> None:
        try:
            _, _, spec = load_saved(state_dir)
        except Exception:  # noqa: BLE001 - nothing saved, nothing to clean
            return
        self.api_socket(spec).unlink(missing_ok=True)
        if self.jailer:
            # The jail holds only hard links (the VM's disk stays in its state dir) and an empty
            # cgroup the jailer created; both go once the VMM is gone (a host cgroup: in base).
            shutil.rmtree(self._jail_root(spec).parent, ignore_errors=True)
            if self.host_cgroup:
                return
            exec_name = os.path.basename(shutil.which(self.binary) or self.binary)
            try:
                os.rmdir(f"/sys/fs/cgroup/{exec_name}/{spec.uid}")
            except OSError:
                pass
