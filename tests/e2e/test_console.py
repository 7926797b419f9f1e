"""`kubectl mikrom console NAME` on a real QEMU guest: a terminal (a pty) attached to the VM's serial
port through the socket its supervisor keeps, a command typed and answered, Ctrl-] detaching with
the terminal restored, the VM still running and the exchange in console.log. The same console
through `python -m mikrom.worker console-relay UID`, which is what `--via-pod` runs in the worker
pod through `kubectl exec -i`.

The test image's /init runs no shell on its serial port, so the test boots the same kernel and
initrd plus one more initramfs archive (the kernel unpacks concatenated archives in order) holding
/serial-shell, started as `rdinit=`: it puts an interactive busybox shell on the console, then
execs the image's own /init.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import termios
from pathlib import Path

import pytest
from harness import binaries
from harness.terminal import Terminal
from harness.vms import e2e_skip_reason, vmm_pids

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

SERIAL_SHELL = """#!/bin/busybox sh
# tests only: an interactive root shell on the serial console, beside the image's own /init
# (/dev first: a background command's stdin is /dev/null)
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 3<&0 4>&1
/bin/busybox setsid /bin/busybox sh -i <&3 >&4 2>&4 3<&- 4>&- &
exec /init
"""


def console_initrd(image_dir: Path) -> str:
    """initrd.img plus an archive holding /serial-shell, as initrd-console.img; its name."""
    extra = image_dir / "extra"
    extra.mkdir()
    (extra / "serial-shell").write_text(SERIAL_SHELL)
    (extra / "serial-shell").chmod(0o755)
    archive = subprocess.run("echo serial-shell | cpio -o -H newc --quiet | gzip -9", shell=True, cwd=extra,
                             capture_output=True, check=True, timeout=30).stdout
    (image_dir / "initrd-console.img").write_bytes((image_dir / "initrd.img").read_bytes() + archive)
    return "initrd-console.img"


def test_kubectl_mikrom_console_types_into_a_real_guest_and_ctrl_bracket_detaches_restoring_the_terminal(
        fleet, make_worker, netns, own_image_dir, control_plane):
    initrd = console_initrd(own_image_dir)
    worker = make_worker(netns=netns, image_dir=own_image_dir)
    fleet.node = worker.node
    fleet.create("tty", network=False, image={"kernel": {"path": "vmlinuz"}, "initrd": {"path": initrd},
                                              "kernelArgs": "console=ttyS0 reboot=k panic=1 rdinit=/serial-shell"})
    st = fleet.wait_phase("tty", "Running", timeout=120, avoid=("Failed",))
    uid = fleet.get("tty")["metadata"]["uid"]
    vm_dir = worker.vms_dir / uid

    env = dict(os.environ, KUBECONFIG=str(control_plane.kubeconfig),
               PATH=f"{Path(sys.executable).parent}:{binaries.require('kubectl').parent}:{os.environ['PATH']}")
    term = Terminal()
    before = termios.tcgetattr(term.slave)
    assert before[3] & termios.ECHO and before[3] & termios.ICANON  # a cooked terminal, as a shell leaves it
    plugin = subprocess.Popen(["kubectl", "mikrom", "console", "-n", fleet.ns, "tty", "--state-dir", str(worker.state_dir)],
                              stdin=term.slave, stdout=term.slave, stderr=term.slave, env=env, start_new_session=True)
    try:
        term.expect(b"Ctrl-] detaches", timeout=30)
        raw = termios.tcgetattr(term.slave)
        assert not raw[3] & (termios.ECHO | termios.ICANON | termios.ISIG), "the plugin puts the terminal in raw mode"
        # the guest's shell answers what is typed; its tty echoes the line, so only the answer says 42
        term.type(b"echo MIKROM-$((6*7)) $(/bin/busybox uname -s)\r")
        term.expect(b"MIKROM-42 Linux", timeout=60)
        term.type(b"\x1d")  # Ctrl-]
        assert plugin.wait(timeout=20) == 0
        term.expect(b"detached", timeout=5)
        assert termios.tcgetattr(term.slave) == before, "the terminal is restored"
    finally:
        if plugin.poll() is None:
            plugin.kill()
            plugin.wait()
        term.close()

    # the VM kept running, and its log has the exchange
    assert fleet.status("tty")["phase"] == "Running" and vmm_pids(worker.state_dir, uid) == [st["pid"]]
    assert "MIKROM-42 Linux" in (vm_dir / "console.log").read_text(errors="replace")

    # what `--via-pod` runs in the worker pod: the relay on stdin/stdout, to the same socket
    relay = subprocess.Popen([sys.executable, "-m", "mikrom.worker", "console-relay", uid,
                              "--state-dir", str(worker.state_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        relay.stdin.write(b"echo RELAY-$((7*6))\n")
        relay.stdin.flush()
        seen = b""
        while b"RELAY-42" not in seen:
            assert select.select([relay.stdout], [], [], 60)[0], f"no answer through the relay: {seen!r}"
            data = os.read(relay.stdout.fileno(), 65536)
            assert data, f"the relay ended: {seen!r} {relay.stderr.read()!r}"
            seen += data
        relay.stdin.close()  # kubectl exec's stdin ending: the relay lets go of the console
        assert relay.wait(timeout=20) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert fleet.status("tty")["phase"] == "Running"
