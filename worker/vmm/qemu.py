"""QEMU `microvm` driver: KVM when it is really usable, software emulation (TCG) otherwise.

The guest's serial console goes to QEMU's stdout, which the supervisor (consolecap.py) drains into
the capped console log. A QMP socket in the state dir is the control channel; a graceful stop is
QMP `system_powerdown` (the ACPI power button), which a guest handles like a real one (systemd
logind, or acpid in our test image).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from .base import Driver, VMMError, VMSpec, kvm_status, merge_kernel_args

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

    def config(self) -> dict:
        return {**super().config(), "binary": self.binary, "accel": self.forced_accel}

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

    def command(self, spec: VMSpec) -> list[str]:
        state = Path(spec.state_dir).resolve()
        accel = self.accel()
        argv = [
            self.binary, "-M", "microvm", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-name", _opt(f"mikrom-{spec.uid}"),
            "-smp", str(spec.vcpus), "-m", f"{spec.memory_mib}M",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "stdio",
            "-qmp", f"unix:{_opt(state / 'qmp.sock')},server=on,wait=off",
            "-kernel", spec.kernel,
            "-append", self.kernel_args(spec, accel),
        ]
        if spec.initrd:
            argv += ["-initrd", spec.initrd]
        if spec.rootfs:
            argv += ["-drive", f"id=rootfs,file={_opt(spec.rootfs)},format=raw,if=none",
                     "-device", "virtio-blk-device,drive=rootfs"]
        if spec.tap:
            net = "virtio-net-device,netdev=n0" + (f",mac={spec.mac}" if spec.mac else "")
            argv += ["-netdev", f"tap,id=n0,ifname={spec.tap},script=no,downscript=no", "-device", net]
        if spec.netns:
            argv = ["ip", "netns", "exec", spec.netns, *argv]
        return argv

    def _prepare(self, spec: VMSpec) -> None:
        (Path(spec.state_dir) / "qmp.sock").unlink(missing_ok=True)

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
