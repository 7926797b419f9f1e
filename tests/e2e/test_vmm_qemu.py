"""Real VM boots with the QEMU microvm driver, inside a network namespace the test creates.

The guest is the test image from hack/test-image.sh (Debian cloud kernel + busybox initramfs).
Nothing here touches the host's own interfaces: the bridge, the tap, the NAT rules and the VMM
process all live in a throwaway network namespace, and the only traffic is a ping from that
namespace's bridge to the guest.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from harness.netns import ping
from mikrom.worker import netdev
from mikrom.worker.vmm import (
    BootTimeout,
    QemuDriver,
    VMMExited,
    VMSpec,
    restart_from_saved,
    running_pid,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces, tap devices, apt-get"),
]

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 60.0
BRIDGE = "mkbr0"
GATEWAY = "10.231.0.1"
PREFIX = 24


@pytest.fixture
def network(netns):
    netdev.ensure_bridge(BRIDGE, f"{GATEWAY}/{PREFIX}", netns=netns)
    return netns


@pytest.fixture
def stopper():
    """Stops every VM a test started, whatever happened in the test."""
    dirs: list[Path] = []
    yield dirs
    for state in dirs:
        QemuDriver().stop(state, timeout=0)


def make_spec(guest_image_dir: Path, state_dir: Path, netns: str, host: int = 2, uid: str | None = None,
              extra_args: str = "") -> VMSpec:
    uid = uid or str(uuid.uuid4())
    tap = netdev.tap_name_for_uid(uid)
    netdev.ensure_tap(tap, BRIDGE, netns=netns)
    ip = f"10.231.0.{host}"
    return VMSpec(uid=uid, name=f"vm-{host}", vcpus=1, memory_mib=128, kernel=str(guest_image_dir / "vmlinuz"),
                  initrd=str(guest_image_dir / "initrd.img"),
                  kernel_args=f"{netdev.kernel_ip_arg(ip, GATEWAY, PREFIX)} {extra_args}".strip(),
                  tap=tap, mac=netdev.mac_for_uid(uid), state_dir=state_dir, netns=netns)


def guest_ip(spec: VMSpec) -> str:
    return next(w for w in spec.kernel_args.split() if w.startswith("ip=")).split("=")[1].split(":")[0]


def live_processes_mentioning(text: str) -> list[str]:
    """Non-zombie processes whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state not in ("Z", "X") and text in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def test_vm_boots_in_a_netns_answers_ping_and_powers_off_gracefully(guest_image_dir, network, tmp_path, stopper,
                                                                     record_property):
    driver = QemuDriver()
    spec = make_spec(guest_image_dir, tmp_path / "vm", network)
    stopper.append(spec.state_dir)
    pid = driver.start(spec)
    boot = driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
    record_property("boot_seconds", round(boot, 3))
    print(f"\nqemu ({driver.accel()}) boot to MIKROM-READY: {boot:.2f}s")

    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].endswith(b"qemu-system-x86_64")
    append = cmdline[cmdline.index(b"-append") + 1].decode()
    assert ("tsc_early_khz=" in append) == (driver.accel() == "tcg")
    assert f"ip={guest_ip(spec)}::{GATEWAY}:255.255.255.0::eth0:off" in append
    # The VMM runs in the namespace, not in ours: its network namespace differs from the test's.
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")

    res = ping(network, guest_ip(spec))
    assert res.returncode == 0, res.stdout + res.stderr

    t0 = time.monotonic()
    driver.stop(spec.state_dir, timeout=30)
    stop_seconds = time.monotonic() - t0
    print(f"graceful stop: {stop_seconds:.2f}s")
    assert stop_seconds < 30, "the guest should power off on system_powerdown, not need SIGKILL"
    console = (spec.state_dir / "console.log").read_text()
    assert "MIKROM-POWEROFF" in console, console[-2000:]
    assert json.loads((spec.state_dir / "exit.json").read_text())["returncode"] == 0
    assert running_pid(spec.state_dir) is None
    assert live_processes_mentioning(str(spec.state_dir)) == []
    assert not (spec.state_dir / "qmp.sock").exists()
    driver.stop(spec.state_dir, timeout=30)  # stopping a stopped VM is fine


_STARTER = """
import json, sys, time
from mikrom.worker.vmm import QemuDriver, VMSpec
spec = VMSpec.from_dict(json.loads(sys.argv[1]))
print(QemuDriver().start(spec), flush=True)
time.sleep(600)
"""


def test_vm_survives_the_death_of_its_starter_and_restarts_from_saved_config(guest_image_dir, network, tmp_path,
                                                                             stopper):
    spec = make_spec(guest_image_dir, tmp_path / "vm", network, host=3)
    stopper.append(spec.state_dir)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    starter = subprocess.Popen([sys.executable, "-c", _STARTER, json.dumps(spec.to_dict())],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([starter.stdout], [], [], 60)
        assert ready, "the starter printed no pid within 60s"
        pid = int(starter.stdout.readline())
    finally:
        starter.kill()  # SIGKILL: the worker dies without any cleanup
        starter.wait(timeout=10)

    # A new "worker" (this process) adopts the VM from the state dir alone.
    assert running_pid(spec.state_dir) == pid
    driver = QemuDriver()
    driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
    assert ping(network, guest_ip(spec)).returncode == 0
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    assert ppid != starter.pid

    driver.stop(spec.state_dir, timeout=30)
    assert running_pid(spec.state_dir) is None

    new_pid = restart_from_saved(spec.state_dir)
    assert new_pid != pid and running_pid(spec.state_dir) == new_pid
    boot = driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
    print(f"\nrestart from vm.json, boot to MIKROM-READY: {boot:.2f}s")
    assert ping(network, guest_ip(spec)).returncode == 0
    driver.stop(spec.state_dir, timeout=30)
    assert live_processes_mentioning(str(spec.state_dir)) == []


def test_a_guest_that_panics_is_reported_as_exited_with_its_console(guest_image_dir, network, tmp_path, stopper):
    driver = QemuDriver()
    # No init in the initramfs under this name: the kernel panics, panic=-1 reboots, and QEMU's
    # -no-reboot turns that into an exit.
    spec = make_spec(guest_image_dir, tmp_path / "vm", network, host=4, extra_args="rdinit=/no-such-init")
    stopper.append(spec.state_dir)
    driver.start(spec)
    with pytest.raises(VMMExited, match="Kernel panic") as err:
        driver.wait_ready(spec, timeout=BOOT_TIMEOUT)
    assert err.value.reason == "VMMExited"
    assert running_pid(spec.state_dir) is None


def test_a_boot_timeout_leaves_the_vm_running_until_it_is_killed(guest_image_dir, network, tmp_path, stopper):
    driver = QemuDriver()
    spec = make_spec(guest_image_dir, tmp_path / "vm", network, host=5)
    stopper.append(spec.state_dir)
    pid = driver.start(spec)
    with pytest.raises(BootTimeout):
        driver.wait_ready(spec, timeout=0.2)
    assert running_pid(spec.state_dir) == pid
    driver.stop(spec.state_dir, timeout=0)  # no grace: straight SIGKILL
    assert running_pid(spec.state_dir) is None
    assert live_processes_mentioning(str(spec.state_dir)) == []


@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_host_network_setup_is_idempotent_inside_a_namespace(netns, backend):
    if not shutil.which(backend):
        pytest.skip(f"{backend} is not installed")
    tap = netdev.tap_name_for_uid("idempotent")
    for _ in range(2):
        netdev.ensure_bridge(BRIDGE, f"{GATEWAY}/{PREFIX}", netns=netns)
        netdev.ensure_tap(tap, BRIDGE, netns=netns)
        netdev.ensure_nat(BRIDGE, f"10.231.0.0/{PREFIX}", netns=netns, backend=backend)
    addrs = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "dev", BRIDGE],
                           capture_output=True, text=True, timeout=10).stdout
    assert addrs.count(f"{GATEWAY}/{PREFIX}") == 1
    link = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "dev", tap],
                          capture_output=True, text=True, timeout=10).stdout
    assert f"master {BRIDGE}" in link and "UP" in link
    rules = netdev.nat_rules(netns=netns, backend=backend)
    assert len(rules) == 3, rules
    assert any("MASQUERADE" in r or "masquerade" in r for r in rules)
    forward = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/sys/net/ipv4/ip_forward"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    assert forward == "1"
    assert netdev.list_taps(netns=netns) == [tap]  # the bridge is not a tap, though named mk...
    netdev.delete_tap(tap, netns=netns)
    netdev.delete_tap(tap, netns=netns)
    assert netdev.list_taps(netns=netns) == []
    with pytest.raises(netdev.NetdevError, match="not a bridge"):
        netdev.ensure_bridge("lo", f"{GATEWAY}/{PREFIX}", netns=netns)


def test_nat_lets_the_block_reach_beyond_the_node(netns, backend_ns):
    """A namespace on the bridge stands in for a guest; another namespace, reachable only through
    the node's uplink and with no route back to the block, stands in for the outside world. The
    ping can only come back if the node masqueraded it."""
    backend, guest_ns, outside_ns = backend_ns
    netdev.ensure_bridge(BRIDGE, f"{GATEWAY}/{PREFIX}", netns=netns)
    netdev.ensure_nat(BRIDGE, f"10.231.0.0/{PREFIX}", netns=netns, backend=backend)

    def ip(*args):
        subprocess.run(["ip", *args], check=True, timeout=10)

    ip("link", "add", "mkg0", "netns", guest_ns, "type", "veth", "peer", "name", "mkg1", "netns", netns)
    ip("-n", netns, "link", "set", "mkg1", "master", BRIDGE, "up")
    ip("-n", guest_ns, "addr", "add", f"10.231.0.9/{PREFIX}", "dev", "mkg0")
    ip("-n", guest_ns, "link", "set", "mkg0", "up")
    ip("-n", guest_ns, "route", "add", "default", "via", GATEWAY)
    ip("link", "add", "mku0", "netns", netns, "type", "veth", "peer", "name", "mku1", "netns", outside_ns)
    ip("-n", netns, "addr", "add", "192.0.2.1/24", "dev", "mku0")
    ip("-n", netns, "link", "set", "mku0", "up")
    ip("-n", outside_ns, "addr", "add", "192.0.2.2/24", "dev", "mku1")
    ip("-n", outside_ns, "link", "set", "mku1", "up")

    res = ping(guest_ns, "192.0.2.2")
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(params=["iptables", "nft"])
def backend_ns(request, make_netns):
    if not shutil.which(request.param):
        pytest.skip(f"{request.param} is not installed")
    return request.param, make_netns(), make_netns()
