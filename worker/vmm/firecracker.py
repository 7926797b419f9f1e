"""Firecracker driver: start the process, configure it over its API socket, boot.

The API is HTTP/1.1 over a unix socket (spec: Firecracker's firecracker-api yaml, a copy of which
the tests validate every request against). `build_requests` is the whole configuration as data;
`start` sends it in order, ending with `InstanceStart`. A graceful stop is the `SendCtrlAltDel`
action (the guest sees Ctrl-Alt-Del on its i8042 and reboots, which ends Firecracker); the base
driver kills after the timeout.

With a `JailerConfig` the VMM runs through Firecracker's `jailer` (chroot, dropped uid/gid,
cgroup v2): kernel, initrd and rootfs are hard-linked into the chroot and the API sees chroot
paths. The tap must then be owned by the jail's uid (netdev.ensure_tap(user=...)).
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
from .base import Driver, VMMStartFailed, VMSpec, kvm_status, load_saved, merge_kernel_args

API_SOCKET = "fc.sock"
JAIL_API_SOCKET = "/run/firecracker.socket"
BASE_KERNEL_ARGS = ["console=ttyS0", "reboot=k", "panic=1", "pci=off", "i8042.noaux", "i8042.nomux",
                    "i8042.nopnp", "i8042.dumbkbd"]
MEMORY_HEADROOM_MIB = 64  # Firecracker's own memory beside the guest's (documented as under 5 MiB)
CPU_PERIOD_US = 100_000
UNIX_PATH_MAX = 108  # sun_path, including its terminating NUL
_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")  # what firecracker --id and jailer --id accept


@dataclass
class JailerConfig:
    """Run Firecracker through `jailer`."""

    uid: int
    """Unprivileged uid the VMM runs as."""
    gid: int
    """Unprivileged gid the VMM runs as."""
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
        self.jailer = JailerConfig(**jailer) if isinstance(jailer, dict) else jailer
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
    def command(self, spec: VMSpec) -> list[str]:
        if not self.jailer:
            argv = [self.binary, "--api-sock", str(self.api_socket(spec))]
            if _ID.match(spec.uid):
                argv += ["--id", spec.uid]
            return ["ip", "netns", "exec", spec.netns, *argv] if spec.netns else argv
        if not _ID.match(spec.uid):
            raise VMMStartFailed(f"uid {spec.uid!r} is not a valid jailer id")
        j = self.jailer
        argv = [j.binary, "--id", spec.uid, "--exec-file", shutil.which(self.binary) or self.binary,
                "--uid", str(j.uid), "--gid", str(j.gid), "--chroot-base-dir", j.chroot_base,
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
        """Put the VM's files in the chroot. The rootfs (the VM's own copy) is hard-linked, so the
        guest's writes land in the state dir, and handed to the jail's uid. Kernel and initrd are
        shared images: hard-linked when every user may read them, else copied for the jail alone,
        never chowned in place."""
        root = self._jail_root(spec)
        root.mkdir(parents=True, exist_ok=True)
        # Firecracker, already unprivileged, binds its API socket here.
        (root / "run").mkdir(exist_ok=True)
        os.chown(root / "run", self.jailer.uid, self.jailer.gid)
        for path, writable in ((spec.kernel, False), (spec.initrd, False), (spec.rootfs, True)):
            if not path:
                continue
            dest = root / Path(path).name
            # a shared image only root may read: the jail gets a copy of its own
            private = not writable and not os.stat(path).st_mode & 0o004
            if not dest.exists() and (private or not _hard_link(path, dest)):
                subprocess.run(["cp", "--reflink=auto", "--sparse=always", path, str(dest)],
                               check=True, timeout=600, stdin=subprocess.DEVNULL)
            if writable or private:
                os.chown(dest, self.jailer.uid, self.jailer.gid)
            if writable:
                os.chmod(dest, 0o600)

    def _jailed_spec(self, spec: VMSpec) -> VMSpec:
        def inside(path: str | None) -> str | None:
            return "/" + Path(path).name if path else None
        return dataclasses.replace(spec, kernel=inside(spec.kernel), initrd=inside(spec.initrd),
                                   rootfs=inside(spec.rootfs))

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
