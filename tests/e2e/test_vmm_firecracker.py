"""Real VM boots with the Firecracker driver, where Firecracker can run: a `firecracker` binary on
PATH and a /dev/kvm that boots stock kernels (base.kvm_status). Elsewhere the test is skipped with
the exact reason; the driver's API requests are still checked against Firecracker's specification
in tests/unit/test_firecracker_requests.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
from harness.guest_image import guest_image
from harness.netns import ping
from mikrom.worker import netdev
from mikrom.worker.vmm import FirecrackerDriver, JailerConfig, VMSpec, kvm_status, running_pid

BOOT_TIMEOUT = 60.0
BRIDGE = "mkbr0"
GATEWAY = "10.232.0.1"
GUEST = "10.232.0.2"
JAIL_UID = 64123


def _missing() -> str | None:
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, tap devices)")
    if not shutil.which("firecracker"):
        missing.append("a firecracker binary on PATH")
    ok, why = kvm_status()
    if not ok:
        missing.append(f"usable KVM ({why})")
    return "Firecracker boot needs " + "; ".join(missing) if missing else None


pytestmark = [pytest.mark.e2e, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


@pytest.fixture(scope="module")
def guest_vmlinux_dir() -> Path:
    # Firecracker on x86_64 boots an uncompressed ELF kernel: the image directory with `vmlinux` added.
    return guest_image(vmlinux=True)


@pytest.fixture
def network(netns):
    netdev.ensure_bridge(BRIDGE, f"{GATEWAY}/24", netns=netns)
    return netns


@pytest.mark.parametrize("jailed", [False, True], ids=["plain", "jailed"])
def test_firecracker_vm_boots_answers_ping_and_stops_on_ctrl_alt_del(guest_vmlinux_dir, network, tmp_path,
                                                                     record_property, jailed):
    jailer = None
    if jailed:
        if not shutil.which("jailer"):
            pytest.skip("the jailed boot needs Firecracker's jailer binary on PATH")
        jailer = JailerConfig(uid=JAIL_UID, gid=JAIL_UID, chroot_base=str(tmp_path / "jail"))
    uid = str(uuid.uuid4())
    tap = netdev.tap_name_for_uid(uid)
    netdev.ensure_tap(tap, BRIDGE, netns=network, user=JAIL_UID if jailed else None)
    spec = VMSpec(uid=uid, name="fc-1", vcpus=1, memory_mib=128, kernel=str(guest_vmlinux_dir / "vmlinux"),
                  initrd=str(guest_vmlinux_dir / "initrd.img"), kernel_args=netdev.kernel_ip_arg(GUEST, GATEWAY, 24),
                  tap=tap, mac=netdev.mac_for_uid(uid), state_dir=tmp_path / "vm", netns=network)
    driver = FirecrackerDriver(jailer=jailer)
    try:
        pid = driver.start(spec)
        boot = driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
        record_property("boot_seconds", round(boot, 3))
        print(f"\nfirecracker boot to MIKROM-READY: {boot:.2f}s")
        assert running_pid(spec.state_dir) == pid
        res = ping(network, GUEST)
        assert res.returncode == 0, res.stdout + res.stderr

        t0 = time.monotonic()
        driver.stop(spec.state_dir, timeout=30)
        assert time.monotonic() - t0 < 30, "the guest should reboot on Ctrl-Alt-Del, ending Firecracker"
        assert "MIKROM-REBOOT" in (spec.state_dir / "console.log").read_text()
        assert json.loads((spec.state_dir / "exit.json").read_text())["returncode"] == 0
        assert running_pid(spec.state_dir) is None
    finally:
        driver.stop(spec.state_dir, timeout=0)
