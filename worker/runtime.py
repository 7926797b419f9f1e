"""The node's hands: images, addresses, network devices and VMM processes for one VM.

Each method is a step of "make it so" and is safe to repeat after a crash: it looks at what is
already there (the cache, meta.json, the tap, the pid file) before it creates anything. The order
of a start is the reconciler's (reconcile.py): the images are checked while the address and tap are
made, and a refused or corrupt image of a VM that never ran has what was made removed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from mikrom.settings import Settings

from . import hostcgroup, images, ipalloc, netdev, netpolicy, timing, urlguard, vmm
from .locks import NodeLocks
from .state import LocalVM, valid_uid, vmm_processes

log = logging.getLogger(__name__)

ADDRESS_LOCK = "node-addresses"
NETWORK_LOCK = "node-network"
STRAY_GRACE_SECONDS = 3.0
MAX_UNIX_SOCKET_PATH = 107
"""sun_path holds 108 bytes including the terminating NUL."""


class VMMUnavailable(Exception):
    """The MicroVM asks for a VMM this node cannot run."""

    reason = "VMMUnavailable"


@dataclass
class Images:
    kernel: str
    initrd: str | None
    rootfs_source: str | None
    rootfs: str | None = None
    """The VM's own copy of `rootfs_source` (prepare_rootfs)."""


@dataclass
class Address:
    ip: str
    prefix: int
    gateway: str
    mac: str
    tap: str
    namespace: str = ""
    name: str = ""


class Runtime:
    def __init__(self, settings: Settings, locks: NodeLocks):
        self.settings = settings
        self.locks = locks
        self.vms_dir = Path(settings.state_dir) / "vms"
        self.cache_dir = Path(settings.state_dir) / "images"
        self.image_url_allowed = urlguard.parse_cidrs(settings.image_url_allowed_cidrs)
        self.netns = settings.netns or None
        self.policy = netpolicy.policy_config(settings, netdev.TAP_PREFIX)
        self._available: list[str] | None = None
        self._bridges: set[tuple[str, str]] = set()

    def local(self, uid: str) -> LocalVM:
        return LocalVM(self.vms_dir, uid)

    # ------------------------------------------------------------------------------ VMMs

    def driver_configs(self) -> dict[str, dict]:
        """Each driver's settings; saved with every VM, so a restarted worker stops and restarts it
        with the settings it was started with."""
        s = self.settings
        firecracker: dict = {"binary": s.firecracker_binary}
        if s.jailer_binary:
            firecracker["jailer"] = {"binary": s.jailer_binary, "chroot_base": s.jailer_chroot_base,
                                     "cgroup_limits": s.jailer_cgroup_limits}
        host_cgroup = host_cgroup_settings(s)
        return {"qemu": {"binary": s.qemu_binary, "host_cgroup": host_cgroup},
                "firecracker": {**firecracker, "host_cgroup": host_cgroup}}

    def sandbox_config(self) -> vmm.SandboxConfig:
        """How VMMs are confined (worker/vmm/sandbox.py); saved with every VM as well."""
        s = self.settings
        return vmm.SandboxConfig(uid_start=s.vm_uid_range_start, uid_count=s.vm_uid_range_size,
                                 seccomp=s.vmm_seccomp, unprivileged=s.vmm_unprivileged)

    def tap_owner(self, vmm_name: str, local: LocalVM) -> int | None:
        """The uid a VMM opens its tap as, when that is not root: a jailed Firecracker, as its
        VM's own uid (claimed here, before the tap exists). QEMU gets its tap as a descriptor."""
        if vmm_name != "firecracker" or not self.settings.jailer_binary:
            return None
        try:
            return vmm.claim_ids(local.dir, self.sandbox_config()).uid
        except vmm.SandboxUnavailable as exc:
            raise vmm.VMMStartFailed(str(exc)) from exc

    def prepare_vmm(self, vmm_name: str, local: LocalVM) -> None:
        """What the launch would otherwise do first, done ahead (the driver's start repeats it,
        finding it done): stray VMMs of this VM killed and the uid the VMM runs as claimed. Its
        host cgroup comes before, made by `prepare_host_cgroup` for the launcher staged into it."""
        self.reap_strays(local)
        timing.mark("strays")
        try:
            self.driver(vmm_name).vm_ids(local.dir)
            timing.mark("vm_ids")
        except vmm.SandboxUnavailable as exc:
            raise vmm.VMMStartFailed(str(exc)) from exc

    def prepare_host_cgroup(self, vmm_name: str, local: LocalVM, vcpus: int, memory_mib: int) -> None:
        """The VM's host cgroup created (if its driver runs VMMs in one), for `stage_launch`."""
        driver = self.driver(vmm_name)
        if driver.host_cgroup:
            try:
                hostcgroup.create(driver.host_cgroup, local.uid, vcpus, memory_mib)
            except hostcgroup.HostCgroupError as exc:
                raise vmm.VMMStartFailed(str(exc)) from exc
            timing.mark("cgroup_made")

    def stage_launch(self, vmm_name: str, local: LocalVM, vcpus: int, memory_mib: int):
        """The VM's launcher forked ahead, joining its host cgroup while the rest of the start is
        prepared and confirmed (Driver.stage), for `launch`; None if the driver stages nothing."""
        return self.driver(vmm_name).stage(local.dir, local.uid, vcpus, memory_mib)

    def available_vmms(self) -> list[str]:
        if self._available is None:
            self._available = vmm.available_drivers(self.driver_configs())
        return self._available

    def default_vmm(self) -> str:
        if self.settings.default_vmm:
            return self.settings.default_vmm
        return "firecracker" if "firecracker" in self.available_vmms() else "qemu"

    def driver(self, name: str) -> vmm.Driver:
        if name not in self.available_vmms():
            raise VMMUnavailable(f"spec.vmm: {name} cannot run on this node (available: "
                                 f"{', '.join(self.available_vmms()) or 'none'})")
        return vmm.get_driver(name, console_max_bytes=self.settings.console_max_bytes,
                              sandbox=self.sandbox_config(), **self.driver_configs()[name])

    # ------------------------------------------------------------------------------ images

    def resolve_images(self, image: dict) -> Images:
        """Every file the VM boots from, checked (path) or downloaded and verified (url)."""
        def one(what: str) -> str | None:
            source = image.get(what)
            if not source:
                return None
            if source.get("path"):
                return str(images.resolve_path(self.settings.image_dir, source["path"],
                                               field=f"spec.image.{what}.path"))
            if source.get("url"):
                digest = (source.get("sha256") or "").strip().lower()
                timeout = self.settings.image_download_timeout_seconds
                # VMs created together with the same image wait for one download instead of each
                # fetching it: the second finds it in the cache.
                key = "image-" + hashlib.sha256(digest.encode()).hexdigest()[:32]
                with self.locks.hold(key, timeout=timeout + 30) as held:
                    held.remove = True
                    return str(images.fetch(source["url"], digest, self.cache_dir, timeout=timeout,
                                            max_bytes=self.settings.image_max_bytes,
                                            field=f"spec.image.{what}.url",
                                            allowed_cidrs=self.image_url_allowed))
            raise images.ImageRefused(f"spec.image.{what}: needs a path or a url")

        kernel = one("kernel")
        if kernel is None:
            raise images.ImageRefused("spec.image.kernel: required")
        return Images(kernel=kernel, initrd=one("initrd"), rootfs_source=one("rootfs"))

    # ------------------------------------------------------------------------------ network

    def allocate_address(self, local: LocalVM, cidr: str, preferred: str | None) -> Address:
        """The VM's address: the one recorded in meta.json, else `preferred` (status.ipAddress)
        when free, else the lowest free one. Recorded in meta.json before anything uses it."""
        gw = ipalloc.gateway(cidr)
        meta = local.read_meta()
        with self.locks.hold(ADDRESS_LOCK, timeout=30):
            used = set()
            for other in self.vms_dir.iterdir() if self.vms_dir.is_dir() else ():
                if other.name != local.uid:
                    ip = LocalVM(self.vms_dir, other.name).read_meta().get("ip") if valid_uid(other.name) else None
                    if ip:
                        used.add(ip)
            ip = ipalloc.pick(cidr, used, meta.get("ip") or preferred)
            address = Address(ip=ip, prefix=gw.network.prefixlen, gateway=str(gw.ip),
                              mac=netdev.mac_for_uid(local.uid), tap=netdev.tap_name_for_uid(local.uid),
                              namespace=meta.get("namespace", ""), name=meta.get("name", ""))
            local.update_meta(ip=ip, prefix=address.prefix, gateway=address.gateway, mac=address.mac,
                              tap=address.tap)
        return address

    def ensure_network(self, cidr: str, address: Address, tap_owner: int | None = None) -> None:
        """Bridge (with the gateway), NAT, the network policy's tables and the VM's tap. The bridge,
        NAT and policy tables are checked once per process and block (about ten
        `ip`/`iptables`/`nft` calls; the first check also brings every local VM's entry up to
        date); if the tap cannot join the bridge, they are checked again. The VM's own policy
        entry is `ensure_policy_entry`: until it exists the tap drops everything."""
        gw = ipalloc.gateway(cidr)
        key = (self.settings.bridge, str(gw))
        for attempt in (1, 2):
            if key not in self._bridges:
                # two VMs starting at once must not both add the gateway address
                with self.locks.hold(NETWORK_LOCK, timeout=60):
                    netdev.ensure_bridge(self.settings.bridge, str(gw), netns=self.netns)
                    netdev.ensure_nat(self.settings.bridge, str(gw.network), netns=self.netns)
                    netpolicy.ensure_tables(self.policy, netns=self.netns)
                    if self.policy.enabled:
                        netpolicy.sync(self._policy_entries(), netns=self.netns, prune=True)
                self._bridges.add(key)
            try:
                netdev.ensure_tap(address.tap, self.settings.bridge, netns=self.netns, user=tap_owner)
                timing.mark("tap")
                return
            except netdev.NetdevError:
                self._bridges.discard(key)
                if attempt == 2:
                    raise

    def ensure_policy_entry(self, address: Address) -> None:
        """The VM's network policy entry (its tap, MAC, address and namespace), if the node
        enforces a policy. Either order with the tap is safe: a tap of ours without its entry drops
        everything, and an entry without its tap matches nothing. So a start makes it while its
        VMM is already booting (the guest sends nothing for a while), and Running is reported only
        once it is in place."""
        if not self.policy.enabled:
            return
        entry = netpolicy.VMEntry(address.tap, address.mac, address.ip, address.namespace, address.name)
        netpolicy.ensure_vm(entry, netns=self.netns)
        timing.mark("policy_entry")

    def _policy_entries(self) -> list[netpolicy.VMEntry]:
        """The policy entry of every local VM with an address (from its meta.json)."""
        entries = []
        for other in sorted(self.vms_dir.iterdir()) if self.vms_dir.is_dir() else ():
            meta = LocalVM(self.vms_dir, other.name).read_meta() if valid_uid(other.name) else {}
            if all(meta.get(k) for k in ("tap", "mac", "ip", "namespace")):
                entries.append(netpolicy.VMEntry(meta["tap"], meta["mac"], meta["ip"], meta["namespace"],
                                                 meta.get("name", "")))
        return entries

    # ------------------------------------------------------------------------------ lifecycle

    def prepare_rootfs(self, local: LocalVM, imgs: Images) -> None:
        """The VM's own copy of its rootfs, made once (kept across stops and restarts)."""
        if imgs.rootfs_source and not imgs.rootfs:
            imgs.rootfs = str(images.prepare_rootfs(imgs.rootfs_source, local.dir,
                                                    timeout=self.settings.image_download_timeout_seconds))

    def build_spec(self, local: LocalVM, vm: dict, imgs: Images, address: Address | None) -> vmm.VMSpec:
        spec = vm.get("spec", {})
        args = spec.get("image", {}).get("kernelArgs", "console=ttyS0 reboot=k panic=1")
        self.prepare_rootfs(local, imgs)
        rootfs = imgs.rootfs
        if address:
            args = f"{args} " + netdev.kernel_ip_arg(address.ip, address.gateway, address.prefix,
                                                     hostname=vm["metadata"]["name"][:63])
        return vmm.VMSpec(uid=local.uid, name=vm["metadata"]["name"], vcpus=int(spec.get("vcpus", 1)),
                          memory_mib=int(spec.get("memoryMiB", 512)), kernel=imgs.kernel, initrd=imgs.initrd,
                          rootfs=rootfs, kernel_args=args, tap=address.tap if address else None,
                          mac=address.mac if address else None, state_dir=local.dir, netns=self.netns)

    def launch(self, local: LocalVM, spec: vmm.VMSpec, vmm_name: str, strays_reaped: bool = False,
               staged=None) -> int:
        """Start the VMM (or return the pid of the one already running for this VM); first kill
        its strays unless the caller just did (prepare_vmm, under the same lock). `staged`
        (stage_launch) takes the launch; it is closed in any case."""
        try:
            return self._launch(local, spec, vmm_name, strays_reaped, staged)
        finally:
            if staged is not None:
                staged.close()

    def _launch(self, local: LocalVM, spec: vmm.VMSpec, vmm_name: str, strays_reaped: bool, staged) -> int:
        driver = self.driver(vmm_name)
        longest = len(str((local.dir / "qmp.sock").resolve()).encode())
        if longest > MAX_UNIX_SOCKET_PATH:
            # QEMU and Firecracker put their control sockets in the state directory
            raise vmm.VMMStartFailed(f"the state directory {local.dir} is too long for unix sockets "
                                     f"({longest} > {MAX_UNIX_SOCKET_PATH} bytes): set a shorter MIKROM_STATE_DIR")
        if not strays_reaped:
            self.reap_strays(local)
        return driver.start(spec, staged=staged)

    def wait_ready(self, local: LocalVM) -> float:
        spec = vmm.spec_from_state(local.dir)
        took = vmm.driver_for_state(local.dir).wait_ready(spec, timeout=self.settings.boot_timeout_seconds)
        if timing.current() is not None:
            run = _read_json(local.dir / "run.json") or {}
            ready = _read_json(local.dir / "ready") or {}
            for step, at in (run.get("steps_monotonic") or {}).items():
                if isinstance(at, (int, float)):
                    timing.mark(f"sup_{step}", at=at)
            if "started_monotonic" in run:
                timing.mark("vmm_exec", at=run["started_monotonic"])
            if "monotonic" in ready:
                timing.mark("ready_marker", at=ready["monotonic"])
        return took

    def stop(self, local: LocalVM, timeout: float | None = None) -> None:
        """Stop the VM's VMM (gracefully, then killed after the timeout); fine if none runs."""
        timeout = self.settings.stop_timeout_seconds if timeout is None else timeout
        if (local.dir / "vm.json").exists():
            try:
                driver = vmm.driver_for_state(local.dir)
            except vmm.VMMError:
                driver = None
            if driver is not None:
                driver.stop(local.dir, timeout=timeout)
        self.reap_strays(local, grace=0.0)

    def reap_strays(self, local: LocalVM, grace: float = STRAY_GRACE_SECONDS) -> None:
        """Kill VMM processes of this VM that no pid file accounts for (a launch cut short by a
        worker crash, or a state directory removed under a running VMM)."""
        deadline = time.monotonic() + grace
        while True:
            known = local.pid()
            strays = [p for p in vmm_processes(self.vms_dir).get(local.uid, []) if p != known]
            if not strays:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)  # the supervisor may be about to write the pid file
        for pid in strays:
            log.warning("killing stray VMM process %d of %s", pid, local.uid)
            kill_pid(pid)

    def teardown(self, uid: str) -> bool:
        """Stop the VM and remove its tap and state directory. True if anything was there."""
        local = self.local(uid)
        meta = local.read_meta()
        had = local.exists()
        self.stop(local)
        tap = meta.get("tap") or netdev.tap_name_for_uid(uid)
        if netdev.link_exists(tap, self.netns):
            had = True
            netdev.delete_tap(tap, self.netns)
        if had:
            local.remove()
        cgroups = host_cgroup_settings(self.settings)
        if cgroups:  # one made ahead for a VM that never started (prepare_host_cgroup); a stop removes the others
            hostcgroup.remove(hostcgroup.HostCgroupConfig.from_dict(cgroups), uid, timeout=0)
        # once more without the directory, under the lock of the policy sync (which reads the
        # directories), so no sync that started before the removal can leave an entry behind
        with self.locks.hold(NETWORK_LOCK, timeout=60):
            netpolicy.remove_vm(tap, self.netns)
        return had


def host_cgroup_settings(s: Settings) -> dict | None:
    """The drivers' host cgroup settings (hostcgroup.HostCgroupConfig.from_dict), None when off."""
    if not s.host_cgroups:
        return None
    return {"root": s.host_cgroup_root, "parent": s.host_cgroup_parent,
            "memory_overhead_mib": s.host_cgroup_memory_overhead_mib}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kill_pid(pid: int, wait: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.05)

