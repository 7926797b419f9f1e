"""Each VM's VMM (with its supervisor) in a cgroup of its own under the host's cgroup root.

A process started inside a pod's container, detached or not, lives in that container's cgroup,
and the container runtime kills everything in it when the pod goes: a VM would not outlive a
worker pod's deletion or upgrade. So the worker creates, for each VM,

    <root>/<hierarchy>/<parent>/<uid>      cgroup v1: in every mounted hierarchy (cpu, memory,
                                           freezer, pids, ..., and the v2 one of a hybrid host)
    <root>/<parent>/<uid>                  cgroup v2 (unified)

where `root` is the host's cgroup mount seen through a hostPath (`MIKROM_HOST_CGROUP_ROOT`) and
`parent` is `MIKROM_HOST_CGROUP_PARENT` (`mikrom`). The group is capped at the VM's shape: its
vCPUs as a CFS quota (`cpu.cfs_quota_us`/`cpu.cfs_period_us` in v1, `cpu.max` in v2) and its
memory plus an overhead for the VMM itself (`memory.limit_in_bytes` / `memory.max`), so the guest's
RAM is charged to the VM's group and never to the worker's container. The supervisor writes its own
pid into the group's `cgroup.procs` files before it starts the VMM (consolecap.py
`--cgroup-procs`), so the VMM is born there and nothing it allocates is charged elsewhere. The
group is removed once the VMM is gone.

The functions without I/O (`group_dir`, `limits`, `parse_proc_cgroup`, ...) are separated from the
few that touch the filesystem, and every write is a plain small file write on cgroupfs (no
blocking beyond the kernel's own).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CPU_PERIOD_US = 100_000
"""The CFS period the quota is expressed in (the kernel's default)."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class HostCgroupError(Exception):
    """The VM's host cgroup could not be created, limited or joined; the VM is not started."""

    reason = "HostCgroupFailed"


@dataclass(frozen=True)
class HostCgroupConfig:
    """Where the VMs' cgroups go and how much room the VMM gets beyond the guest."""

    root: str = "/sys/fs/cgroup"
    """The host's cgroup mount as the worker sees it (a hostPath of the host's /sys/fs/cgroup)."""
    parent: str = "mikrom"
    """Parent group of every VM's group, relative to each hierarchy's root."""
    memory_overhead_mib: int = 256
    """Memory the group allows beyond the guest's own: the VMM process and the supervisor."""
    namespace: str = "/proc/1/ns/cgroup"
    """The host's cgroup namespace (pid 1's, seen through `hostPID`), entered by the supervisor
    before it joins the group when the worker runs in another one (see foreign_cgroup_namespace)."""

    def __post_init__(self):
        check_parent(self.parent)
        if self.memory_overhead_mib < 0:
            raise ValueError(f"memory_overhead_mib must be >= 0, got {self.memory_overhead_mib}")

    @classmethod
    def from_dict(cls, data: dict | None) -> HostCgroupConfig | None:
        """The config saved with a VM (driver settings); None when host cgroups are off."""
        if not data:
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy."""

    path: Path
    """Its mount point (under the configured root)."""
    version: int
    """1 or 2."""
    controllers: frozenset[str] = field(default_factory=frozenset)
    """v1: the controllers bound to it (from the mount's directory name, `cpu,cpuacct`); v2: the
    controllers its root offers (`cgroup.controllers`)."""


@dataclass
class Placement:
    """What `create` made: the files the supervisor writes its pid into, and the limits written."""

    procs: list[Path]
    limits: dict[str, str]
    """`<hierarchy dir name>/<file>` (or `<file>` on a pure v2 host) -> the value written."""


# --------------------------------------------------------------------------- pure functions

def check_parent(parent: str) -> str:
    """`parent` as a relative group path of plain names (no `..`, no absolute path)."""
    parts = parent.split("/")
    if not parent or any(not _NAME.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"host cgroup parent {parent!r} must be a relative path of names made of "
                         f"letters, digits, '_', '.' and '-'")
    return parent


def group_dir(hierarchy: Path | str, parent: str, uid: str) -> Path:
    """The VM's group inside one hierarchy."""
    if not _UID.match(uid or ""):
        raise ValueError(f"uid {uid!r} cannot name a cgroup")
    return Path(hierarchy) / check_parent(parent) / uid


def memory_limit_bytes(memory_mib: int, overhead_mib: int) -> int:
    return (int(memory_mib) + int(overhead_mib)) << 20


def limits(version: int, vcpus: int, memory_mib: int, overhead_mib: int,
           period_us: int = CPU_PERIOD_US) -> dict[str, str]:
    """The limit files of a VM's group and their values, in the order they must be written.

    v1 writes the period before the quota (a quota is checked against the current period).
    """
    if vcpus < 1 or memory_mib < 1:
        raise ValueError(f"a VM needs vcpus >= 1 and memory_mib >= 1, got {vcpus}, {memory_mib}")
    memory = str(memory_limit_bytes(memory_mib, overhead_mib))
    quota = vcpus * period_us
    if version == 1:
        return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota),
                "memory.limit_in_bytes": memory}
    if version == 2:
        return {"cpu.max": f"{quota} {period_us}", "memory.max": memory}
    raise ValueError(f"unknown cgroup version {version}")


def v1_controllers(dir_name: str) -> frozenset[str]:
    """The controllers of a v1 hierarchy from its mount directory (`cpu,cpuacct`; `systemd` for
    the named `name=systemd` hierarchy)."""
    return frozenset(c for c in dir_name.split(",") if c)


def needed_v2_controllers(offered: frozenset[str]) -> list[str]:
    """The v2 controllers to enable below the root for our limits, of those the parent offers."""
    return [c for c in ("cpu", "memory") if c in offered]


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as {controllers: path}; the v2 hierarchy's key is the empty string."""
    out = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def jailer_cgroup_args(version: int, vcpus: int, memory_mib: int, overhead_mib: int) -> list[str]:
    """Firecracker jailer `--cgroup FILE=VALUE` arguments for the same limits."""
    args: list[str] = []
    for name, value in limits(version, vcpus, memory_mib, overhead_mib).items():
        args += ["--cgroup", f"{name}={value}"]
    return args


# --------------------------------------------------------------------------- discovery

def hierarchies(root: str | os.PathLike) -> list[Hierarchy]:
    """The hierarchies mounted under `root`: the root itself on a pure v2 host, else each mount
    directory (symlinks such as `cpu -> cpu,cpuacct` are aliases and skipped)."""
    root = Path(root)
    controllers = root / "cgroup.controllers"
    if controllers.exists():
        return [Hierarchy(root, 2, frozenset(controllers.read_text().split()))]
    found = []
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise HostCgroupError(f"cannot list the host cgroup root {root}: {exc.strerror}") from None
    for name in entries:
        path = root / name
        if path.is_symlink() or not path.is_dir() or not (path / "cgroup.procs").exists():
            continue
        if (path / "cgroup.controllers").exists():
            found.append(Hierarchy(path, 2, frozenset((path / "cgroup.controllers").read_text().split())))
        else:
            found.append(Hierarchy(path, 1, v1_controllers(name)))
    if not found:
        raise HostCgroupError(f"no cgroup hierarchy is mounted under {root}")
    return found


def host_version(root: str | os.PathLike) -> int:
    """2 on a pure v2 (unified) host, else 1 (a v1 or hybrid host: limits live in v1)."""
    return 2 if (Path(root) / "cgroup.controllers").exists() else 1


def foreign_cgroup_namespace(host_namespace: str) -> str | None:
    """`host_namespace` when this process is in another cgroup namespace (a pod with a private
    cgroup namespace, as containers on cgroup v2 hosts get), else None; also None when it cannot
    be read. With cgroup2 mounted `nsdelegate` (systemd does), the kernel refuses to move a process
    to a group outside its own namespace's root, so the supervisor enters the host's first."""
    try:
        if os.readlink("/proc/self/ns/cgroup") != os.readlink(host_namespace):
            return host_namespace
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- I/O

def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise HostCgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _mkdir(hier: Hierarchy, path: Path) -> None:
    """Create one level of a group; a new cpuset group needs its CPUs and memory nodes before any
    process may join it, so it inherits its parent's."""
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        raise HostCgroupError(f"cannot create the cgroup {path}: {exc.strerror}") from None
    for name in ("cpuset.cpus", "cpuset.mems"):
        own = path / name
        if hier.version == 1 and own.exists() and not own.read_text().strip():
            _write(own, (path.parent / name).read_text().strip())


def _enable_v2(level: Path) -> None:
    """Let the children of `level` (a v2 group) use cpu and memory, where `level` offers them."""
    offered = frozenset((level / "cgroup.controllers").read_text().split())
    enabled = frozenset((level / "cgroup.subtree_control").read_text().split())
    missing = [c for c in needed_v2_controllers(offered) if c not in enabled]
    if missing:
        _write(level / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


_made: dict[tuple[str, str, str], tuple[tuple[int, int, int], Placement]] = {}
"""The groups this process made, by (root, parent, uid): the shape they were limited to and the
placement, so the launch right after the preparation (which made the group) does not walk every
hierarchy again (tens of small cgroupfs operations on a v1 host). Dropped by `remove`."""


def create(cfg: HostCgroupConfig, uid: str, vcpus: int, memory_mib: int) -> Placement:
    """Create (or keep) the VM's group in every hierarchy and write its limits. Safe to repeat."""
    placement = _create(cfg, uid, vcpus, memory_mib)
    _made[(cfg.root, cfg.parent, uid)] = ((vcpus, memory_mib, cfg.memory_overhead_mib), placement)
    return placement


def made(cfg: HostCgroupConfig, uid: str, vcpus: int, memory_mib: int) -> Placement | None:
    """The placement `create` made in this process for this VM at this shape, if its groups are
    all still there (else None: create it again)."""
    shape, placement = _made.get((cfg.root, cfg.parent, uid), (None, None))
    if placement is None or shape != (vcpus, memory_mib, cfg.memory_overhead_mib):
        return None
    if not all(Path(p).exists() for p in placement.procs):
        return None
    return placement


def _create(cfg: HostCgroupConfig, uid: str, vcpus: int, memory_mib: int) -> Placement:
    placement = Placement(procs=[], limits={})
    for hier in hierarchies(cfg.root):
        group = group_dir(hier.path, cfg.parent, uid)
        level = hier.path
        for part in group.relative_to(hier.path).parts:
            if hier.version == 2:
                _enable_v2(level)
            level = level / part
            _mkdir(hier, level)
        for name, value in limits(hier.version, vcpus, memory_mib, cfg.memory_overhead_mib).items():
            if (group / name).exists():  # only the hierarchy holding that controller has the file
                _write(group / name, value)
                key = name if hier.path == Path(cfg.root) else f"{hier.path.name}/{name}"
                placement.limits[key] = value
        placement.procs.append(group / "cgroup.procs")
    return placement


def join(procs: list[Path], pid: int) -> None:
    """Move `pid` into the VM's group in every hierarchy."""
    for path in procs:
        _write(Path(path), str(pid))


def members(cfg: HostCgroupConfig, uid: str) -> set[int]:
    """Pids in the VM's group, in any hierarchy."""
    pids: set[int] = set()
    try:
        hiers = hierarchies(cfg.root)
    except HostCgroupError:
        return pids
    for hier in hiers:
        try:
            text = (group_dir(hier.path, cfg.parent, uid) / "cgroup.procs").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return pids


def remove(cfg: HostCgroupConfig, uid: str, timeout: float = 5.0) -> bool:
    """Remove the VM's group from every hierarchy once it is empty; True when none is left.

    A group still holding a process (the supervisor draining its last console bytes) is retried
    until `timeout`, then left for the next stop or cleanup, with a warning.
    """
    _made.pop((cfg.root, cfg.parent, uid), None)
    try:
        hiers = hierarchies(cfg.root)
    except HostCgroupError:
        return True
    deadline = time.monotonic() + timeout
    left = []
    for hier in hiers:
        group = group_dir(hier.path, cfg.parent, uid)
        while True:
            try:
                group.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                    left.append(f"{group} ({exc.strerror})")
                    break
                time.sleep(0.05)
    if left:
        log.warning("host cgroups of %s not removed: %s", uid, ", ".join(left))
    return not left


def supervisor_args(cfg: HostCgroupConfig, uid: str, vcpus: int, memory_mib: int) -> list[str]:
    """Create the VM's group and return the supervisor's options that make it join the group
    before it starts the VMM (consolecap.py `--cgroup-procs`, `--cgroupns`); a group this process
    made a moment ago for the same shape (the start's preparation) is taken as it is."""
    placement = made(cfg, uid, vcpus, memory_mib) or create(cfg, uid, vcpus, memory_mib)
    log.info("host cgroup of %s: %s", uid, ", ".join(f"{k}={v}" for k, v in placement.limits.items()) or "no limits")
    args: list[str] = []
    for path in placement.procs:
        args += ["--cgroup-procs", str(path)]
    namespace = foreign_cgroup_namespace(cfg.namespace)
    if namespace:
        args += ["--cgroupns", namespace]
    return args
