"""Who a VMM runs as and what it is handed: each VM's own unprivileged uid/gid, QEMU's seccomp
policy, the VMM's environment, and read-only copies of shared images.

Every VM on a node gets a uid (and a gid of the same number) of its own from a configured range,
so that one compromised VMM cannot signal, ptrace or read the memory of another, nor open files
another VM's VMM owns. The choice is recorded in the VM's state directory (`sandbox.json`) and
reused by every later start, restart and adoption. New ids are chosen under a lock on the node's
VM directory (the parent of every state directory): the first id, counted from a hash of the VM's
uid, that no other state directory records, that no live process runs as and that no local account
(/etc/passwd, /etc/group) has. Removing the state directory frees the id.

Standard library only (the supervisor shares nothing with the worker's imports).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .. import procfs

IDS_FILE = "sandbox.json"
"""In each VM's state directory: the uid and gid its VMM runs as."""
LOCK_FILE = ".vm-ids.lock"
"""In the node's VM directory: held while an id is chosen."""
LOCK_TIMEOUT = 30.0
COPY_TIMEOUT = 600.0

QEMU_SECCOMP = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
"""QEMU's `-sandbox`: seccomp mode 2 without obsolete system calls, set*uid/set*gid, fork/exec,
or scheduler and affinity changes. QEMU installs it before it runs the guest."""

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_PASSED = ("PATH",)
"""The only variables a VMM and its supervisor get from the worker (which holds the broker's
password, the API server's credentials and the like in its own environment)."""


class SandboxUnavailable(Exception):
    """The VMM cannot be confined as configured (no free id, /dev/kvm only for root)."""

    reason = "VMMStartFailed"


@dataclass
class SandboxConfig:
    """How a driver confines its VMMs; saved with the driver's settings in vm.json."""

    uid_start: int = 200000
    """First uid (and gid) of the range VMMs run as."""
    uid_count: int = 65536
    """Size of the range: at most this many VMs per node."""
    seccomp: bool = True
    """QEMU runs with `-sandbox` (QEMU_SECCOMP)."""
    unprivileged: bool = True
    """QEMU runs as its VM's uid/gid, every file and device handed over as a descriptor."""

    def __post_init__(self):
        self.uid_start, self.uid_count = int(self.uid_start), int(self.uid_count)
        if self.uid_start < 1 or self.uid_count < 1 or self.uid_start + self.uid_count > 0xFFFFFFFE:
            raise ValueError(f"VM uid range {self.uid_start}+{self.uid_count} must lie within 1..4294967293")

    @classmethod
    def from_dict(cls, data: dict | SandboxConfig | None) -> SandboxConfig:
        if isinstance(data, cls):
            return data
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def contains(self, uid: int) -> bool:
        return self.uid_start <= uid < self.uid_start + self.uid_count


@dataclass(frozen=True)
class VMIds:
    """The uid and gid one VM's VMM runs as."""

    uid: int
    gid: int


def recorded_ids(state_dir: str | os.PathLike) -> VMIds | None:
    """The ids recorded in a state directory, or None."""
    try:
        data = json.loads((Path(state_dir) / IDS_FILE).read_text())
        return VMIds(int(data["uid"]), int(data["gid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim_ids(state_dir: str | os.PathLike, config: SandboxConfig) -> VMIds:
    """The VM's ids: the recorded ones while they are in the range and no other VM on the node
    records them, else a free id, recorded before it is returned. Safe to call again."""
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    with _node_lock(state.parent / LOCK_FILE):
        others = _recorded_elsewhere(state)
        own = recorded_ids(state)
        if own and own.uid == own.gid and config.contains(own.uid) and own.uid not in others:
            return own
        uid = _free_id(state.name, config, others | _live_uids() | _local_accounts())
        ids = VMIds(uid, uid)
        _write_atomic(state / IDS_FILE, json.dumps(dataclasses.asdict(ids)))
        return ids


def _free_id(key: str, config: SandboxConfig, taken: set[int]) -> int:
    first = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % config.uid_count
    for step in range(config.uid_count):
        uid = config.uid_start + (first + step) % config.uid_count
        if uid not in taken:
            return uid
    raise SandboxUnavailable(f"no free VM uid left in {config.uid_start}..{config.uid_start + config.uid_count - 1}"
                             " (MIKROM_VM_UID_RANGE_START/SIZE)")


def _recorded_elsewhere(state: Path) -> set[int]:
    found = set()
    try:
        entries = list(os.scandir(state.parent))
    except OSError:
        return found
    for entry in entries:
        if entry.name != state.name and entry.is_dir(follow_symlinks=False):
            ids = recorded_ids(entry.path)
            if ids:
                found.update((ids.uid, ids.gid))
    return found


def _live_uids() -> set[int]:
    """Real uids of every live process (a VM of another state directory, or anything else)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        text = procfs.read(f"/proc/{entry}/status", 4096)
        at = text.find(b"\nUid:")
        if at >= 0:
            try:
                found.add(int(text[at + 5:].split(None, 1)[0]))
            except (ValueError, IndexError):
                continue
    return found


def _local_accounts() -> set[int]:
    """Ids of local users and groups (files only: a directory service lookup could block)."""
    found = set()
    for path in ("/etc/passwd", "/etc/group"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split(":")
                    if len(parts) > 2 and parts[2].isdigit():
                        found.add(int(parts[2]))
        except OSError:
            continue
    return found


class _node_lock:
    """flock on the node's id lock file, polled so that a wait never blocks an event loop."""

    def __init__(self, path: Path, timeout: float = LOCK_TIMEOUT):
        self.path, self.timeout, self.fd = path, timeout, -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise SandboxUnavailable(f"{self.path} stayed locked for {self.timeout:.0f}s") from None
                time.sleep(0.02)

    def __exit__(self, *exc):
        os.close(self.fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------- devices and environment

def kvm_groups(device: str = "/dev/kvm") -> list[int]:
    """Supplementary groups an unprivileged VMM needs for /dev/kvm: none when everyone may use
    it, its group when that group may. Raises SandboxUnavailable when only root may."""
    try:
        st = os.stat(device)
    except OSError as exc:
        raise SandboxUnavailable(f"{device}: {exc.strerror}") from None
    return groups_for_device(st.st_mode, st.st_gid)


def groups_for_device(mode: int, gid: int) -> list[int]:
    """kvm_groups for a device of this mode and group."""
    if mode & 0o006 == 0o006:
        return []
    if mode & 0o060 == 0o060 and gid != 0:
        return [gid]
    raise SandboxUnavailable("/dev/kvm is usable by root only: give it to a group (mode 0660, e.g. udev's "
                             "`kvm` group) or let QEMU run as root (MIKROM_VMM_UNPRIVILEGED=false)")


def vmm_environment(env: dict | None = None) -> dict:
    """The environment of a VMM and its supervisor: ENV_PASSED from `env` (the worker's) and LANG=C."""
    env = os.environ if env is None else env
    clean = {name: env[name] for name in ENV_PASSED if env.get(name)}
    clean.setdefault("PATH", DEFAULT_PATH)
    clean["LANG"] = "C"
    return clean


# ------------------------------------------------------------------------- shared images

def readable_by_anyone(path: str | os.PathLike) -> bool:
    return bool(os.stat(path).st_mode & 0o004)


def _safe_to_link(st: os.stat_result) -> bool:
    """A shared file the VMM may see as it is: root's, writable by nobody else, readable by all."""
    return st.st_uid == 0 and not st.st_mode & 0o022 and bool(st.st_mode & 0o004)


def copy_read_only(src: str | os.PathLike, dest: Path, gid: int | None) -> None:
    """A read-only copy of `src` at `dest`, owned by root: mode 0444, or 0440 with group `gid`
    when only that group may read it. Written under a temporary name, so `dest` is never half."""
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        res = subprocess.run(["cp", "--reflink=auto", "--sparse=always", "--", str(src), str(tmp)],
                             capture_output=True, text=True, timeout=COPY_TIMEOUT, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise SandboxUnavailable(f"copying {src} for the VMM failed: {res.stderr.strip()}")
        os.chown(tmp, 0, 0 if gid is None else gid, follow_symlinks=False)
        os.chmod(tmp, 0o444 if gid is None else 0o440)
        os.replace(tmp, dest)
    except subprocess.TimeoutExpired:
        raise SandboxUnavailable(f"copying {src} for the VMM took longer than {COPY_TIMEOUT:.0f}s") from None
    finally:
        tmp.unlink(missing_ok=True)


def stage_shared(src: str | os.PathLike, dest: Path, gid: int) -> None:
    """Put a shared image (image directory, download cache) at `dest` for a VMM of group `gid`
    without ever changing `src`: a hard link when `src` is root's, unwritable by others and
    readable by all; else a copy, 0444 root, or 0440 root:`gid` when only root could read `src`."""
    dest.unlink(missing_ok=True)
    st = os.stat(src)
    if _safe_to_link(st):
        try:
            os.link(src, dest, follow_symlinks=True)
            return
        except OSError:
            pass  # another filesystem: copy
    copy_read_only(src, dest, None if st.st_mode & 0o004 else gid)
