"""What the operator knows between API calls.

- The latest MicroVMs, MicroVMNodes and IPPools seen on the watch streams. kopf index handlers feed
  them, so kopf runs no other handler before the initial listing of all three is complete: a VM is
  never judged against a half-known cluster.
- Assignments made but not yet written (reservations), so two placements never double-book a node.
- Per-VM bookkeeping that does not belong in the API: which dispatch this process delivered, failed
  sends and their backoff, and when each VM's phase last moved.

Thread-safe: kopf calls the index handlers on its event loop and the synchronous handlers in its
thread pool. No lock is ever held across I/O.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mikrom import names
from mikrom.settings import Settings

from . import placement

if TYPE_CHECKING:
    from .decide import Sent

GONE_REMEMBERED = 10000  # uids of deleted VMs kept to ignore late answers about them


@dataclass(frozen=True)
class Reservation:
    node: str
    vcpus: int
    memory_mib: int


@dataclass(frozen=True)
class SendFailure:
    count: int
    next_try: float  # time.monotonic()
    task_id: str


def _rv(body: dict) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:  # resourceVersion is opaque in principle; every known store uses integers
        return 0


def _copy(body: dict) -> dict:
    """A deep copy without `metadata.managedFields`: nothing here reads them, and they are most of
    an object's size, so copying each watch event's body would spend its time on them."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("managedFields", None)
    out["metadata"] = meta
    return copy.deepcopy(out)


_VM_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                "deletionTimestamp", "finalizers")
"""What the operator reads of a MicroVM's metadata (decide, the status writes, Events)."""
_VM_ANNOTATIONS = names.GROUP + "/"
"""Only Mikrom's own annotations (restartedAt, force-delete) are read; kopf's progress and diff
base (under operator.mikrom.io/) and kubectl's last-applied-configuration each repeat the object."""


def _vm_copy(body: dict) -> dict:
    """What the view keeps of a MicroVM: spec and status whole (decide reads them), and of its
    metadata only the fields read here. Without managedFields, labels and foreign annotations a
    VM costs its spec and status, whatever a tenant or a tool piles onto its metadata."""
    meta = body.get("metadata") or {}
    kept = {k: meta[k] for k in _VM_METADATA if k in meta}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(_VM_ANNOTATIONS)}
    if annotations:
        kept["annotations"] = annotations
    out = {k: body[k] for k in ("apiVersion", "kind") if k in body}
    out["metadata"] = copy.deepcopy(kept)
    for k in ("spec", "status"):
        if k in body:
            out[k] = copy.deepcopy(body[k])
    return out


def _uid(body: dict) -> str:
    return (body.get("metadata") or {}).get("uid", "")


def _placement_signature(node: dict | None) -> tuple:
    if node is None:
        return ()
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    return (tuple(sorted((meta.get("labels") or {}).items())), spec.get("schedulable", True), spec.get("cidr"),
            tuple(sorted((status.get("capacity") or {}).items())), tuple(status.get("vmms") or ()), ready,
            bool(meta.get("deletionTimestamp")))


def _holds_address(vm: dict) -> bool:
    """Whether an assigned VM holds an address from its node's block (`State.addresses_on`)."""
    return bool((vm.get("spec") or {}).get("network")) and (vm.get("status") or {}).get("phase") != "Succeeded"


class State:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._vms: dict[str, dict] = {}
        self._nodes: dict[str, dict] = {}
        self._pools: dict[str, dict] = {}
        self._reservations: dict[str, Reservation] = {}
        self._delivered: dict[str, str] = {}
        self._failures: dict[str, SendFailure] = {}
        self._sent: dict[str, Sent] = {}
        """uid -> the create sent for a VM whose placement write has not landed yet (docs/protocol.md,
        Dispatch); forgotten once a write landed, or with the object."""
        self._progress: dict[str, tuple[str | None, float]] = {}
        self._vm_locks: dict[str, threading.Lock] = {}
        self._seen: dict[tuple[str, str], float] = {}
        self._gone: dict[str, None] = {}  # insertion-ordered, trimmed to GONE_REMEMBERED
        self._taken_up: set[str] = set()
        """VMs a reconcile of this process has started from (`latest`): after a restart, how far
        the new process has caught up (the gauge mikrom_operator_microvms_reconciled)."""
        self._by_node: dict[str, set[str]] = {}
        """status.node -> uids: a node's check visits its own VMs, not the cluster's."""
        self._held: dict[str, tuple[int, int, int]] = {}
        """status.node -> (vCPUs, MiB, VM count) of the assigned VMs that hold capacity there,
        kept up to date by `_index` as VMs come, change and go (so a placement reads it without
        walking every VM)."""
        self._addressed: dict[str, int] = {}
        """status.node -> how many of its VMs hold (or will hold) an address from its block."""
        self.placement_lock = threading.Lock()
        """Held while choosing a node and reserving it: placements are serialised."""
        self.waker: Callable[[], None] | None = None
        """Called (from any thread) when capacity may have appeared, to retry pending VMs."""

    # ------------------------------------------------------------------ observation

    def observe_vm(self, body: dict) -> dict:
        """Remember `body` unless a newer version is known; return the newest known version."""
        uid = _uid(body)
        with self._lock:
            if uid in self._gone:  # a late write's answer must not bring a deleted VM back
                return _vm_copy(body)
            known = self._vms.get(uid)
            if known is not None and _rv(known) >= _rv(body):
                return known
            body = _vm_copy(body)
            self._vms[uid] = body
            self._index(uid, known, body)
            phase = (body.get("status") or {}).get("phase")
            last = self._progress.get(uid)
            if last is None or last[0] != phase:
                self._progress[uid] = (phase, time.time())
            if (body.get("status") or {}).get("node"):
                self._reservations.pop(uid, None)
            freed = known is not None and placement.holds(known) and not placement.holds(body)
        if freed:
            self.wake()
        return body

    def _index(self, uid: str, old: dict | None, new: dict | None) -> None:
        """Keep the per-node index and the per-node totals up to date as the view's copy of a VM
        goes from `old` to `new` (either None: it came or went); call with the lock held. The
        view's copies are never changed in place, so `old` is what was added for the VM."""
        was = ((old or {}).get("status") or {}).get("node")
        now = ((new or {}).get("status") or {}).get("node")
        if was != now:
            if was:
                self._by_node.get(was, set()).discard(uid)
                if not self._by_node.get(was):
                    self._by_node.pop(was, None)
            if now:
                self._by_node.setdefault(now, set()).add(uid)
        for vm, sign in ((old, -1), (new, 1)):
            if vm is None:
                continue
            node = (vm.get("status") or {}).get("node")
            if not node:
                continue
            if placement.holds(vm):
                cpu, mem = placement.shape(vm)
                had = self._held.get(node, (0, 0, 0))
                total = (had[0] + sign * cpu, had[1] + sign * mem, had[2] + sign)
                if total[2]:
                    self._held[node] = total
                else:
                    self._held.pop(node, None)
            if _holds_address(vm):
                count = self._addressed.get(node, 0) + sign
                if count:
                    self._addressed[node] = count
                else:
                    self._addressed.pop(node, None)

    def forget_vm(self, uid: str, deleted: bool = True) -> None:
        with self._lock:
            if deleted:
                self._gone[uid] = None
                while len(self._gone) > GONE_REMEMBERED:
                    del self._gone[next(iter(self._gone))]
            known = self._vms.pop(uid, None)
            held = self._reservations.pop(uid, None)
            self._index(uid, known, None)
            for d in (self._delivered, self._failures, self._sent, self._progress, self._vm_locks):
                d.pop(uid, None)
            self._taken_up.discard(uid)
        if (known is not None and placement.holds(known)) or held:
            self.wake()

    def observe_node(self, body: dict) -> None:
        name = body["metadata"]["name"]
        with self._lock:
            self._seen[("node", name)] = time.monotonic()
            old = self._nodes.get(name)
            if old is not None and _rv(old) >= _rv(body):
                return
            self._nodes[name] = _copy(body)
            changed = _placement_signature(old) != _placement_signature(body)
        if changed:
            self.wake()

    def forget_node(self, name: str) -> None:
        with self._lock:
            self._nodes.pop(name, None)
            self._seen.pop(("node", name), None)

    def observe_pool(self, body: dict) -> None:
        name = body["metadata"]["name"]
        with self._lock:
            self._seen[("pool", name)] = time.monotonic()
            old = self._pools.get(name)
            if old is not None and _rv(old) >= _rv(body):
                return
            self._pools[name] = _copy(body)
        if old is None:
            self.wake()

    def forget_pool(self, name: str) -> None:
        with self._lock:
            self._pools.pop(name, None)
            self._seen.pop(("pool", name), None)

    def touch(self, kind: str, key: str) -> None:
        """Note that kopf still knows the MicroVMNode or IPPool (its timer ran)."""
        with self._lock:
            self._seen[(kind, key)] = time.monotonic()

    def prune(self, max_age: float) -> list[str]:
        """Forget MicroVMNodes and IPPools nobody has touched for `max_age` seconds. A replica that
        was paused by peering and resumed re-lists everything but hears nothing of objects deleted
        meanwhile; without this they would hold node capacity forever. (MicroVMs have no timer to
        touch them: `prune_vms` compares them with a LIST.)"""
        cutoff = time.monotonic() - max_age
        with self._lock:
            stale = [k for k, t in self._seen.items() if t < cutoff]
            for kind, key in stale:
                del self._seen[(kind, key)]
        for kind, key in stale:
            if kind == "vm":
                self.forget_vm(key, deleted=False)
            else:
                {"node": self.forget_node, "pool": self.forget_pool}[kind](key)
        return [f"{kind}/{key}" for kind, key in stale]

    def prune_vms(self, listed: set[str], version: int) -> list[str]:
        """Forget the VMs missing from a LIST (`listed`: its uids, `version`: its resourceVersion)
        that are not newer than it: deleted while their DELETED event was missed (a watch down, a
        replica paused by peering), they would otherwise hold node capacity forever."""
        with self._lock:
            stale = [uid for uid, vm in self._vms.items() if uid not in listed and _rv(vm) <= version]
        for uid in stale:
            self.forget_vm(uid, deleted=False)
        return [f"vm/{uid}" for uid in stale]

    def wake(self) -> None:
        if self.waker is not None:
            self.waker()

    # ------------------------------------------------------------------ queries

    def vm(self, uid: str) -> dict | None:
        with self._lock:
            return self._vms.get(uid)

    def latest(self, body: dict) -> dict:
        """The newest known version of the VM `body` is a version of: what a reconcile starts from."""
        newest = self.observe_vm(body)
        with self._lock:
            if _uid(body) in self._vms:
                self._taken_up.add(_uid(body))
        return newest

    def reconciled(self) -> int:
        """How many of the VMs known now a reconcile of this process has started from."""
        with self._lock:
            return len(self._taken_up & self._vms.keys())

    def node(self, name: str) -> dict | None:
        with self._lock:
            return self._nodes.get(name)

    def nodes(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._nodes)

    def pools(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._pools)

    def vms(self) -> list[dict]:
        with self._lock:
            return list(self._vms.values())

    def vms_on(self, node: str) -> list[dict]:
        with self._lock:
            return [self._vms[uid] for uid in self._by_node.get(node, ())]

    def pending(self) -> list[dict]:
        """VMs without a node and not being deleted, oldest first."""
        with self._lock:
            out = [vm for vm in self._vms.values()
                   if not (vm.get("status") or {}).get("node") and not vm["metadata"].get("deletionTimestamp")]
        return sorted(out, key=lambda vm: (vm["metadata"].get("creationTimestamp", ""), vm["metadata"]["name"]))

    def allocated(self) -> dict[str, tuple[int, int, int]]:
        """node -> (vCPUs, MiB, VM count) held by assigned VMs and by reservations not yet written."""
        with self._lock:
            out = dict(self._held)
            for uid, r in self._reservations.items():
                if not (self._vms.get(uid, {}).get("status") or {}).get("node"):
                    cpu, mem, count = out.get(r.node, (0, 0, 0))
                    out[r.node] = (cpu + r.vcpus, mem + r.memory_mib, count + 1)
            return out

    def addresses_on(self, node: str) -> int:
        """VMs on `node` that hold (or will hold) an address from its block."""
        with self._lock:
            return self._addressed.get(node, 0) + sum(
                1 for uid, r in self._reservations.items()
                if r.node == node and not (self._vms.get(uid, {}).get("status") or {}).get("node"))

    def guest_addresses(self) -> list[str]:
        with self._lock:
            return [vm["status"]["ipAddress"] for vm in self._vms.values() if (vm.get("status") or {}).get("ipAddress")]

    # ------------------------------------------------------------------ bookkeeping

    def reserve(self, uid: str, reservation: Reservation) -> None:
        with self._lock:
            self._reservations[uid] = reservation

    def release(self, uid: str) -> None:
        with self._lock:
            self._reservations.pop(uid, None)

    def reservation(self, uid: str) -> Reservation | None:
        with self._lock:
            return self._reservations.get(uid)

    def delivered(self, uid: str) -> str | None:
        with self._lock:
            return self._delivered.get(uid)

    def mark_delivered(self, uid: str, task_id: str) -> None:
        with self._lock:
            self._delivered[uid] = task_id
            self._failures.pop(uid, None)

    def failure(self, uid: str) -> SendFailure | None:
        with self._lock:
            return self._failures.get(uid)

    def mark_failed(self, uid: str, task_id: str, delay_for: Callable[[int], float]) -> SendFailure:
        """Record a failed send; `delay_for(failures so far)` says when to try again."""
        with self._lock:
            old = self._failures.get(uid)
            count = old.count + 1 if old else 1
            f = SendFailure(count=count, next_try=time.monotonic() + delay_for(count), task_id=task_id)
            self._failures[uid] = f
            return f

    def sent(self, uid: str) -> Sent | None:
        with self._lock:
            return self._sent.get(uid)

    def remember_sent(self, uid: str, sent: Sent) -> None:
        with self._lock:
            self._sent[uid] = sent

    def forget_sent(self, uid: str) -> None:
        with self._lock:
            self._sent.pop(uid, None)

    def progress_at(self, uid: str) -> float:
        with self._lock:
            return self._progress.get(uid, (None, time.time()))[1]

    def vm_lock(self, uid: str) -> threading.Lock:
        """One lock per VM: handlers, timers and the placement sweep never act on one VM at once."""
        with self._lock:
            return self._vm_locks.setdefault(uid, threading.Lock())


STATE = State()
"""The process's one view (kopf handlers are module-level functions)."""

SETTINGS = Settings.from_env()
"""The operator's settings, from the MIKROM_* environment variables (see `mikrom.settings`)."""
