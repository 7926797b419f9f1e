"""The worker's half of the fence: the node's lease, which every VM's supervisor checks.

`<state_dir>/vms/fence-lease.json` holds a CLOCK_BOOTTIME deadline. The worker pushes it forward
while fence.decide() says it may (its heartbeat reached the API server, or its peers say nobody
can); each supervisor (worker/vmm/consolecap.py) stops its VMM by itself once the deadline has
passed, whatever became of the worker: dead, frozen, crash-looping or cut off. One file for the
node rather than one per VM: one write per heartbeat, and a VM that starts between two renewals
is under the lease from its first instant. A new worker (after a restart) renews the same file,
so adoption keeps working as long as it comes back within `selfFenceAfterSeconds`.

A supervisor that fenced its VMM leaves `fence.json` in the VM's directory. The worker takes it
as its own stop (`desiredStop`) once it is back, so that the VM starts again when it is still
assigned here, not counted as a crash, and torn down when it is assigned elsewhere.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .state import LocalVM, local_uids
from .vmm import consolecap

log = logging.getLogger(__name__)

boottime = consolecap.boottime


def lease_path(vms_dir: str | Path) -> Path:
    return Path(vms_dir) / consolecap.LEASE_FILE


def renew(vms_dir: str | Path, deadline: float, node: str, why: str, ttl: float, kill_after: float) -> dict:
    """Set the lease's deadline (CLOCK_BOOTTIME) to `deadline`, atomically (a supervisor reads the
    old lease or the new one, never half of one)."""
    path = lease_path(vms_dir)
    lease = {"expires_boottime": deadline, "renewed_boottime": boottime(), "renewed_at": time.time(),
             "ttl_seconds": ttl, "kill_after_seconds": kill_after, "node": node, "why": why}
    path.parent.mkdir(parents=True, exist_ok=True)
    consolecap.write_atomic(str(path), json.dumps(lease))
    return lease


def deadline(vms_dir: str | Path) -> float | None:
    """The lease's deadline (CLOCK_BOOTTIME) as it stands now; None without a lease file, 0.0 if it
    cannot be read (an expired lease). A start takes it before its first status write and hands
    it to the supervisor (`--start-before`): the VMM may start only under the lease that was valid
    when the start was decided, never under one renewed after a freeze in between."""
    lease = consolecap.read_lease(str(lease_path(vms_dir)))
    if lease is None:
        return None
    value = lease.get("expires_boottime")
    return float(value) if isinstance(value, (int, float)) else 0.0


def remaining(vms_dir: str | Path) -> float | None:
    """Seconds left on the lease; None without a lease file."""
    lease = consolecap.read_lease(str(lease_path(vms_dir)))
    if lease is None:
        return None
    deadline = lease.get("expires_boottime")
    return deadline - boottime() if isinstance(deadline, (int, float)) else 0.0


def fence_record(local: LocalVM) -> dict | None:
    try:
        data = json.loads((local.dir / consolecap.FENCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def absorb_fences(vms_dir: str | Path) -> list[str]:
    """Record every supervisor's fence not seen yet as the worker's own stop (meta.json
    `desiredStop`, `fenced`); the uids it did."""
    done = []
    for uid in local_uids(vms_dir):
        local = LocalVM(vms_dir, uid)
        record = fence_record(local)
        if not record or local.read_meta().get("fenceSeen") == record.get("at"):
            continue
        local.update_meta(desiredStop=True, fenced=True, fenceSeen=record.get("at"))
        log.warning("the supervisor of %s fenced its VMM: %s", uid, record.get("message"))
        done.append(uid)
    return done
