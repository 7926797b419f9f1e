"""Commands inside a test guest, from the node's side of the bridge.

The test image (hack/test-image.sh) started with `mikrom.test_shell=<port>` on its kernel command
line listens on that TCP port with a shell, one per connection. `guest_sh` sends a script to it
from inside the worker's network namespace (the node's side of the bridge: the only place a guest
is reachable from, and a node-opened connection, which the VM network policy lets the guest answer)
and returns what the script printed.
"""

from __future__ import annotations

import re
import subprocess

SHELL_PORT = 7000
KERNEL_ARGS = f"console=ttyS0 reboot=k panic=1 mikrom.test_shell={SHELL_PORT}"
"""`spec.image.kernelArgs` of a guest a test wants to run commands in."""


def guest_sh(netns: str, ip: str, script: str, timeout: float = 40) -> str:
    """Run `script` with the guest's /bin/sh (as root) and return its output (stdout and stderr)."""
    res = subprocess.run(["ip", "netns", "exec", netns, "timeout", str(int(timeout)), "busybox", "nc", ip,
                          str(SHELL_PORT)], input=script + "\n", capture_output=True, text=True,
                         timeout=timeout + 10)
    return res.stdout


def status_codes(output: str) -> dict[str, int]:
    """`name=<exit status>` lines a script printed (`cmd; echo name=$?`), by name."""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^([\w.-]+)=(\d+)$", output, re.M)}


def snmp_counter(netns: str, ip: str, proto: str, name: str) -> int:
    """A counter of the guest's /proc/net/snmp, e.g. ("Icmp", "InEchos"): what reached its stack."""
    out = guest_sh(netns, ip, "cat /proc/net/snmp")
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith(proto + ":")]
    if len(rows) < 2:
        raise AssertionError(f"no {proto} counters from the guest at {ip}: {out!r}")
    return int(dict(zip(rows[0], rows[1]))[name])
