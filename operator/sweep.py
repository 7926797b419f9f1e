"""The periodic, level-triggered reconcile of MicroVMs, over the operator's own view (`state`).

Once per `reconcileIntervalSeconds` each VM the view holds is looked at, each at its own phase of
the interval (spread by its uid, so 1,000 VMs are not decided in one burst), and reconciled from the
view's copy when it changed since the last look (a status write of its node, which runs no kopf
change handler: kopf's diff leaves status out), or when its decision can change with nothing but
time passing (`time_dependent`):

- a send failed and waits for its backoff (decide: the failed send retried when it is due);
- a dispatch whose goal is not reached: the stall check (re-send after progressTimeoutSeconds,
  give up after maxDispatchAttempts), and a dispatch another process recorded (sent again);
- its node is not Ready, or gone: Unknown, then taken off the node past self-fence + margin,
  or held by the mass-eviction brake until the share of lost nodes falls.

Every other VM's decision changes only with an event: its own (seen here as a new
resourceVersion, or by kopf's change handlers), its node's (the node checks) or capacity's (the
placement sweep); each VM is still reconciled once every FULL_EVERY intervals, a level-triggered
net under those. A VM being deleted
is left to kopf's delete handler, which retries on its own delays.

The view's copy lacks managedFields, labels and foreign annotations, none of which `decide` or the
status writes read; a write is guarded by the copy's resourceVersion, so a stale copy gets a 409
Conflict and is read again (`vms`).

The sweep is driven by the MicroVMNode checks (`tick`, whichever comes first), not by a thread
of its own: kopf stops those timers while peering pauses the operator, and the sweep stops with
them. Without any MicroVMNode nothing is swept; no VM can run then either.

`prune_vms` lists the MicroVMs (metadata only, in pages) and forgets the view's VMs the API server
no longer has: a delete missed while the watch was down or the replica paused must not leave a
phantom VM holding node capacity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time

from mikrom import conditions, kube, names

from . import lifecycle, vms
from .dispatch import DispatchRetry
from .state import SETTINGS, STATE

log = logging.getLogger(__name__)

FULL_EVERY = 10
"""Every VM is reconciled at least once per this many intervals, time-dependent or not."""
LIST_PAGE = 250
"""MicroVMs per page of the prune's LIST: bounds what one response holds in memory."""
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


def time_dependent(vm: dict, node: dict | None, send_failed: bool) -> bool:
    """Whether the decision for `vm` can change with time alone (see the module docstring)."""
    st = vm.get("status") or {}
    if send_failed:
        return True
    d = st.get("dispatch") or {}
    if d.get("intent") and not lifecycle.goal_reached(vm, d["intent"]):
        return True
    if st.get("node"):
        return node is None or not conditions.is_true((node.get("status") or {}).get("conditions"), names.READY)
    return False


def _spread(uid: str) -> tuple[float, int]:
    """A fixed phase in [0, 1) of the interval, and of the FULL_EVERY rounds, for the VM."""
    digest = hashlib.sha256(uid.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32, digest[4] % FULL_EVERY


class Sweep:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, tuple[float, int, str]] = {}
        """uid -> (when it is next looked at, time.monotonic(); rounds looked at; the
        resourceVersion seen at the last look)."""
        self._last = float("-inf")

    def tick(self, now: float | None = None, interval: float | None = None) -> int:
        """Reconcile the VMs due now; returns how many were reconciled. Cheap when called often:
        one caller at a time, at most every tenth of an interval (ticks from other threads meanwhile
        return at once)."""
        interval = SETTINGS.reconcile_interval_seconds if interval is None else interval
        now = time.monotonic() if now is None else now
        if now - self._last < interval / 10 or not self._lock.acquire(blocking=False):
            return 0
        try:
            self._last = now
            todo = self._due(now, interval)
            for vm in todo:
                _reconcile(vm)
            return len(todo)
        finally:
            self._lock.release()

    def _due(self, now: float, interval: float) -> list[dict]:
        todo, seen = [], set()
        for vm in STATE.vms():
            meta = vm["metadata"]
            uid, version = meta["uid"], meta.get("resourceVersion", "")
            seen.add(uid)
            if meta.get("deletionTimestamp"):
                continue
            entry = self._next.get(uid)
            if entry is None:  # new to the sweep: kopf's create or resume handler reconciles it now
                phase, rounds = _spread(uid)
                self._next[uid] = (now + phase * interval, rounds, version)
                continue
            if entry[0] > now:
                continue
            rounds = entry[1] + 1
            # the next look is one interval after the one due, not after now: a late tick does
            # not drift the VM's phase
            self._next[uid] = (max(entry[0] + interval, now), rounds, version)
            node = (vm.get("status") or {}).get("node")
            if version != entry[2] or rounds % FULL_EVERY == 0 or \
                    time_dependent(vm, STATE.node(node) if node else None, STATE.failure(uid) is not None):
                todo.append(vm)
        for uid in self._next.keys() - seen:
            del self._next[uid]
        return todo


def _reconcile(vm: dict) -> None:
    try:
        vms.reconcile(vm, cause="sweep")
    except DispatchRetry:
        pass  # recorded with its backoff; the sweep retries when it is due
    except Exception as exc:  # noqa: BLE001 - one VM must not stop the sweep; the next round retries
        log.warning("reconcile of MicroVM %s/%s failed: %s", vm["metadata"].get("namespace"),
                    vm["metadata"].get("name"), exc)


SWEEP = Sweep()


def listed_uids() -> tuple[set[str], int]:
    """The uids of every MicroVM the operator serves and the LIST's resourceVersion: metadata
    only, in pages of one consistent snapshot."""
    uids: set[str] = set()
    token, version = None, 0
    while True:
        kw = {"limit": LIST_PAGE, "_preload_content": False, "_request_timeout": kube.TIMEOUT,
              "_headers": {"Accept": METADATA_LIST}}
        if token:
            kw["_continue"] = token
        if SETTINGS.namespace:
            res = kube.custom().list_namespaced_custom_object(names.GROUP, names.VERSION, SETTINGS.namespace,
                                                              names.MICROVMS, **kw)
        else:
            res = kube.custom().list_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMS, **kw)
        page = json.loads(res.data)
        for item in page.get("items") or []:
            uids.add((item.get("metadata") or {}).get("uid", ""))
        meta = page.get("metadata") or {}
        if not version:
            version = int(meta.get("resourceVersion") or 0)
        token = meta.get("continue")
        if not token:
            return uids, version


def prune_vms() -> list[str]:
    """Forget the view's VMs missing from a LIST of the MicroVMs (and not newer than it)."""
    try:
        uids, version = listed_uids()
    except Exception as exc:  # noqa: BLE001 - the next prune tries again; nothing is forgotten meanwhile
        log.warning("cannot list MicroVMs to forget deleted ones: %s", exc)
        return []
    return STATE.prune_vms(uids, version)


_last_list: list[float | None] = [None]


def maybe_prune_vms(period: float) -> list[str]:
    """`prune_vms` at most once per `period` seconds, the first a period after the first call (the
    view was just filled by kopf's own listing)."""
    now = time.monotonic()
    if _last_list[0] is None:
        _last_list[0] = now
    if now - _last_list[0] < period:
        return []
    _last_list[0] = now
    return prune_vms()
