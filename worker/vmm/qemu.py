"""QEMU `microvm` driver: KVM when it is really usable, software emulation (TCG) otherwise.

The guest's serial console is QEMU's stdio (`-serial stdio`): stdout, which the supervisor
(consolecap.py) drains into the capped console log, and stdin, a pipe the supervisor feeds from
the VM's interactive console socket. A QMP socket in the state dir is the control channel; a graceful stop is
QMP `system_powerdown` (the ACPI power button), which a guest handles like a real one (systemd
logind, or acpid in our test image).

Sandbox (sandbox.py): QEMU runs with `-sandbox` (seccomp) and as its VM's own uid/gid, dropped
by the supervisor before exec (QEMU's own `-runas` would need the set*id calls the filter denies).
QEMU then opens no path: the supervisor opens, as root, the kernel and initrd (read-only; QEMU
reads them through /proc/self/fd), the VM's disk (an fd set of a read-write and a read-only
descriptor), the tap and the bound QMP socket, and hands them over. A kernel or initrd only root
may read is copied, 0440 root:<the VM's gid>, into the state dir first. The guest name is the
state dir, which is what ties the process to its VM (running_pid, the orphan sweep).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from . import sandbox
from .base import Driver, LaunchPlan, VMMError, VMSpec, kvm_status, merge_kernel_args
from .sandbox import VMIds

ACCEL_ENV = "MIKROM_QEMU_ACCEL"
"""Force the accelerator: `kvm` or `tcg`. Unset: KVM when kvm_status() says it is usable."""

# Firecracker-style arguments for a legacy-free microvm: no PCI, one UART, an i8042 used only for
# reset, no wait for absent hardware. `quiet` matters under TCG, where every console byte is slow.
BASE_KERNEL_ARGS = [
    "console=ttyS0", "reboot=t", "panic=-1", "quiet", "pci=off", "cryptomgr.notests",
    "8250.nr_uarts=1", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    "random.trust_cpu=on",
]


def host_tsc_khz() -> int | None:
    """The host CPU's clock in kHz from /proc/cpuinfo (`cpu MHz`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def kvm_usable() -> bool:
    """Whether QEMU should use KVM: the MIKROM_QEMU_ACCEL override, else the honest KVM check."""
    forced = os.environ.get(ACCEL_ENV, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    return kvm_status()[0]


def _opt(value: str) -> str:
    # QEMU option values separate fields with commas; a literal comma is written twice.
    return str(value).replace(",", ",,")


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self, binary: str = "qemu-system-x86_64", accel: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.binary = binary
        if accel not in (None, "kvm", "tcg"):
            raise ValueError(f"accel must be kvm, tcg or None, not {accel!r}")
        self.forced_accel = accel

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def accel(self) -> str:
        if self.forced_accel:
            return self.forced_accel
        return "kvm" if kvm_usable() else "tcg"

    def kernel_args(self, spec: VMSpec, accel: str) -> str:
        defaults = list(BASE_KERNEL_ARGS)
        khz = host_tsc_khz()
        if accel == "tcg" and khz:
            # Under TCG about 7% of boots otherwise hang for ever calibrating the TSC.
            defaults.append(f"tsc_early_khz={khz}")
        return merge_kernel_args(defaults, spec.kernel_args)

    def config(self) -> dict:
        return {**super().config(), "binary": self.binary, "accel": self.forced_accel}

    def vm_ids(self, state_dir: str | os.PathLike) -> VMIds | None:
        return sandbox.claim_ids(state_dir, self.sandbox) if self.sandbox.unprivileged else None

    def command(self, spec: VMSpec) -> list[str]:
        return self.launch_plan(spec).argv

    def launch_plan(self, spec: VMSpec) -> LaunchPlan:
        state = Path(spec.state_dir).resolve()
        accel = self.accel()
        ids = self.vm_ids(state)
        plan = LaunchPlan(argv=[], netns=spec.netns, run_as=ids,
                          groups=sandbox.kvm_groups() if ids and accel == "kvm" else [])
        qmp = plan.pass_fd("listen", state / "qmp.sock")
        argv = [
            self.binary, "-M", "microvm", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            # QEMU opens no path of its own, so its name carries the state dir (running_pid)
            "-name", f"guest={_opt(state)}/",
            "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        ]
        if self.sandbox.seccomp:
            argv += ["-sandbox", sandbox.QEMU_SECCOMP]
        argv += [
            "-serial", "stdio",
            "-chardev", f"socket,id=qmp,fd={qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control",
            "-kernel", f"/proc/self/fd/{plan.pass_fd('read', self._boot_file(spec, 'kernel'))}",
            "-append", self.kernel_args(spec, accel),
        ]
        if spec.initrd:
            argv += ["-initrd", f"/proc/self/fd/{plan.pass_fd('read', self._boot_file(spec, 'initrd'))}"]
        if spec.rootfs:
            # QEMU picks the descriptor of the access mode it asks for (it probes read-only first).
            for kind in ("rdwr", "read"):
                argv += ["-add-fd", f"fd={plan.pass_fd(kind, spec.rootfs)},set=1,opaque={_opt(spec.rootfs)}"]
            argv += ["-drive", "id=rootfs,file=/dev/fdset/1,format=raw,if=none",
                     "-device", "virtio-blk-device,drive=rootfs"]
        if spec.tap:
            net = "virtio-net-device,netdev=n0" + (f",mac={spec.mac}" if spec.mac else "")
            argv += ["-netdev", f"tap,id=n0,fd={plan.pass_fd('tap', spec.tap)}", "-device", net]
        plan.argv = argv
        return plan

    def _boot_file(self, spec: VMSpec, role: str) -> str:
        """The kernel or initrd the VMM reads: the shared image, or its private copy (_prepare)."""
        private = Path(spec.state_dir) / role
        return str(private) if private.is_file() else getattr(spec, role)

    def _prepare(self, spec: VMSpec) -> None:
        state = Path(spec.state_dir)
        (state / "qmp.sock").unlink(missing_ok=True)
        ids = self.vm_ids(state)
        for role in ("kernel", "initrd"):
            (state / role).unlink(missing_ok=True)
            source = getattr(spec, role)
            # QEMU reopens /proc/self/fd/N, which checks the file's mode against the VM's uid.
            if source and ids and not sandbox.readable_by_anyone(source):
                sandbox.copy_read_only(source, state / role, ids.gid)

    def _graceful_stop(self, state_dir: Path, timeout: float) -> None:
        qmp_command(state_dir / "qmp.sock", "system_powerdown", timeout=timeout)

    def _cleanup(self, state_dir: Path) -> None:
        (state_dir / "qmp.sock").unlink(missing_ok=True)


def qmp_command(sock_path: str | os.PathLike, command: str, arguments: dict | None = None,
                timeout: float = 5.0) -> dict:
    """Run one QMP command (after the capabilities handshake) and return its `return` value."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        reader = _QMPReader(sock, deadline)
        reader.next_message()  # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reader.result()
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        sock.sendall(json.dumps(message).encode() + b"\n")
        return reader.result()


class _QMPReader:
    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.buf = b""

    def next_message(self) -> dict:
        while b"\n" not in self.buf:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("QMP answer timed out")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("QMP socket closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def result(self) -> dict:
        """The next command result, skipping asynchronous events."""
        while True:
            msg = self.next_message()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise VMMError(f"QMP error: {msg['error'].get('desc', msg['error'])}")
