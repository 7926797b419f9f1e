"""What the node holds for each VM, read from disk and /proc only (never from the worker's memory),
so a restarted worker sees exactly what its predecessor left.

`<state_dir>/vms/<uid>/` is written by two parties:
- the VMM driver (`worker/vmm`): vm.json, pid, run.json, ready, exit.json, console.log[.1];
- this module: meta.json, the node's bookkeeping for the VM (which object it belongs to, its
  address, tap and MAC, whether the worker itself stopped it, crash-restart counters).

`observe()` condenses both into an `Observation`, the input of the pure decision in reconcile.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import procfs
from .vmm import base as vmmbase

_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")
PANIC_MARKERS = ("Kernel panic", "kernel BUG at")


@dataclass
class Observation:
    """The node's truth about one VM at one instant."""

    uid: str
    exists: bool = False
    """The state directory exists."""
    configured: bool = False
    """A VMM was started for it at least once (vm.json exists)."""
    pid: int | None = None
    """The live VMM's pid, verified against its command line."""
    ready: bool = False
    """The guest of the current (or last) run printed the ready marker."""
    boot_seconds: float | None = None
    started_at: float | None = None
    """Wall-clock start of the current (or last) run."""
    exited: bool = False
    """The last run's VMM has exited (exit.json is there and no VMM runs)."""
    exit_clean: bool = False
    """It exited with status 0 and no kernel panic on the console: the guest powered off."""
    exit_at: float | None = None
    supervised: bool = True
    """The live VMM's supervisor is there (vmm.base.supervised); False for a VMM left without it."""
    meta: dict = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.pid is not None


def valid_uid(uid: str) -> bool:
    return bool(_UID.match(uid or ""))


class LocalVM:
    """One VM's state directory."""

    def __init__(self, vms_dir: str | os.PathLike, uid: str):
        if not valid_uid(uid):
            raise ValueError(f"invalid uid {uid!r}")
        self.uid = uid
        self.dir = Path(vms_dir) / uid

    @property
    def meta_path(self) -> Path:
        return self.dir / "meta.json"

    def exists(self) -> bool:
        return self.dir.is_dir()

    def read_meta(self) -> dict:
        return _read_json(self.meta_path) or {}

    def update_meta(self, **changes) -> dict:
        """Merge `changes` into meta.json (atomically: a kill mid-write leaves the old file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.read_meta()
        meta.update(changes)
        tmp = self.dir / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(tmp, self.meta_path)
        return meta

    def pid(self) -> int | None:
        return vmmbase.running_pid(self.dir) if (self.dir / "vm.json").exists() else None

    def observe(self) -> Observation:
        obs = Observation(uid=self.uid, exists=self.exists())
        if not obs.exists:
            return obs
        obs.meta = self.read_meta()
        obs.configured = (self.dir / "vm.json").exists()
        if not obs.configured:
            return obs
        obs.pid = self.pid()
        run = _read_json(self.dir / "run.json") or {}
        if obs.pid is not None:
            obs.supervised = vmmbase.supervised(self.dir, obs.pid, run)
        ready = _read_json(self.dir / "ready")
        obs.started_at = run.get("started_at")
        if ready:
            obs.ready = True
            if "started_monotonic" in run:
                obs.boot_seconds = round(max(0.0, ready["monotonic"] - run["started_monotonic"]), 3)
        exit_info = _read_json(self.dir / "exit.json")
        if obs.pid is None and (exit_info or run):
            obs.exited = True
            exit_info = exit_info or {}
            obs.exit_at = exit_info.get("at") or _mtime(self.dir / "run.json")
            tail = vmmbase.console_tail(self.dir, 8192)
            obs.exit_clean = exit_info.get("returncode") == 0 and not any(m in tail for m in PANIC_MARKERS)
        return obs

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():  # something raced us in; once more, loudly
            shutil.rmtree(self.dir)


def local_uids(vms_dir: str | os.PathLike) -> list[str]:
    """uids with a state directory on this node."""
    try:
        return sorted(p.name for p in Path(vms_dir).iterdir() if p.is_dir() and valid_uid(p.name))
    except FileNotFoundError:
        return []


def dir_age_seconds(path: str | os.PathLike) -> float:
    try:
        return max(0.0, time.time() - Path(path).stat().st_mtime)
    except OSError:
        return 0.0


# ------------------------------------------------------------------------------------ processes

def _cmdline(pid: int) -> str:
    return procfs.read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")


def vmm_processes(vms_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Every process whose command line names a VM state directory under `vms_dir`, by uid.

    That covers VMMs whose pid file is missing (a worker killed between launch and the pid file)
    and VMMs whose state directory is gone (orphans). The supervisors (consolecap) are left out:
    they exit by themselves once their VMM has gone.
    """
    root = str(Path(vms_dir).resolve()) + "/"
    marker = root.encode()
    found: dict[str, list[int]] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        raw = procfs.read(f"/proc/{entry}/cmdline")
        if marker not in raw:  # most processes: looked at without decoding
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if root not in cmd or "consolecap" in cmd:
            continue
        uid = cmd.split(root, 1)[1].split("/", 1)[0].split()[0]
        if valid_uid(uid):
            found.setdefault(uid, []).append(int(entry))
    return found


def process_age_seconds(pid: int) -> float:
    """Seconds since `pid` started (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
