"""Helpers of the tests that boot real VMs: whether they can run here, the VMM processes of a
worker's state directory, a client for the test's MicroVMs, and an IPPool of the test's own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mikrom import names

from .microvms import T, MicroVMClient
from .waits import wait_for


def e2e_skip_reason() -> str | None:
    """Why real VM boots cannot run here, or None."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces, tap devices)")
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64 (apt-get install qemu-system-x86)")
    return "worker e2e tests need " + " and ".join(missing) if missing else None


def vmm_pids(state_dir: Path, uid: str | None = None) -> list[int]:
    """Live VMM processes (QEMU or Firecracker) whose command line names a VM under `state_dir`."""
    root = str((Path(state_dir) / "vms").resolve()) + "/" + (uid or "")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if root in cmd and "consolecap" not in cmd and stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            found.append(int(entry))
    return sorted(found)


class VMs(MicroVMClient):
    """The test's MicroVMs, through the admin client, as the e2e tests make them: QEMU, 128 MiB,
    the guest image's kernel and initrd, an address from the test's pool."""

    PHASE_TIMEOUT = 90.0

    def __init__(self, api_client, namespace: str, pool: str | None = None):
        super().__init__(api_client, namespace)
        self.pool = pool
        self.node: str | None = None
        """Pin new VMs to this MicroVMNode (the test's worker), so the session's other nodes never get them."""

    def manifest(self, name: str, network: bool = True, **spec) -> dict:
        body = {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "vmm": "qemu",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
        if network and self.pool:
            body["spec"]["network"] = {"pool": self.pool}
        if self.node:
            body["spec"]["nodeName"] = self.node
        body["spec"].update(spec)
        return body

    def events(self, name: str) -> list:
        items = self.core.list_namespaced_event(self.ns, _request_timeout=T).items
        return sorted((e for e in items if e.involved_object.name == name),
                      key=lambda e: e.metadata.creation_timestamp)

    def wait_event(self, name: str, reason: str, timeout: float = 20, type_: str | None = None):
        """The first Event `reason` on `name` (Events are written just after the status)."""
        def found():
            return next((e for e in self.events(name) if e.reason == reason and (type_ is None or e.type == type_)),
                        None)

        try:
            return wait_for(found, timeout, f"a {reason} event on {name}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its events: {[(e.type, e.reason) for e in self.events(name)]}") from None


def create_pool(api_client, name: str, cidr: str, block_size: int = 26) -> None:
    """An IPPool named `name` handing out `block_size` blocks of `cidr`."""
    MicroVMClient(api_client, "").create_cluster_object(names.IPPOOLS, "IPPool", name,
                                                        {"cidr": cidr, "blockSize": block_size})
