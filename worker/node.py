"""This node's `MicroVMNode`: registration, heartbeats, self-fencing and the periodic local sync.

Started from the worker's startup signal (see tasks.py) as two background loops. Under the gevent
worker `threading` is monkey-patched, so these are greenlets; every call they make has a timeout.

- Heartbeat: every `heartbeat_seconds` the worker patches its MicroVMNode status (capacity,
  VMMs, KVM, `lastHeartbeatTime`), tells its peers in Redis (peers.py) and, if fence.decide()
  allows (the write succeeded, or no live peer reaches the API server either), renews the node's
  lease (lease.py) for `self_fence_after_seconds`. Every VM's supervisor stops its VMM by itself
  once the lease runs out, so the operator may safely recreate them elsewhere once the node is
  lost, even if this worker is dead or frozen; a live worker also stops them itself then.
  A new worker process vouches for its node only from its second round on: its first round
  registers and reports capacity but writes no `lastHeartbeatTime` and renews nothing, so a
  worker that crash-loops (dies within a heartbeat period of each start) keeps no VM alive, in the
  lease or in the operator's eyes: its VMs are fenced and moved as a dead worker's are.
- Sync: right after start (adopting the VMs a previous worker left running) and then every
  `sync_interval_seconds`, or at once when the heartbeat comes back after a gap or finds the node
  marked NotReady (its VMs were reported Unknown and must be re-reported).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from kubernetes.client.rest import ApiException

import mikrom
from mikrom import conditions, kube, names

from . import fence as fencing
from . import lease, maintenance, vmm
from .peers import PeerBoard
from .state import local_uids

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.9
FENCE_STOP_TIMEOUT = 5.0


def host_capacity(vcpus: int = 0, memory_mib: int = 0) -> dict:
    """What the node offers: the settings when given, else the host's CPUs and 90% of its memory."""
    if not vcpus:
        vcpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not memory_mib:
        total_kib = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total_kib = int(line.split()[1])
                    break
        memory_mib = int(total_kib / 1024 * MEMORY_SHARE)
    return {"vcpus": int(vcpus), "memoryMiB": int(memory_mib)}


FENCING_OFF_TTL = 10 * 365 * 86400.0
"""The lease's length while `self_fence_after_seconds` is 0 (fencing off)."""
FIRST_ROUND_WAIT = 60.0
"""How long the first sync waits for the first heartbeat round (its lease renewal): a supervisor
refuses to start a VMM under an expired lease."""


def should_fence(last_ok: float, now: float, fence_after: float) -> bool:
    return fence_after > 0 and now - last_ok > fence_after


class NodeAgent:
    def __init__(self, ctx):
        self.ctx = ctx
        self.settings = ctx.settings
        self.node = ctx.node
        self.cidr: str | None = None
        self.last_ok = time.monotonic()
        self.last_renewed = lease.boottime()
        self.fenced = False
        self.verdict: fencing.Verdict | None = None
        self.peers = PeerBoard(self.settings, self.node)
        self.first_round = threading.Event()
        self.heartbeats = 0
        self._was_ready: bool | None = None
        self.sync_wanted = threading.Event()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------ API

    def labels(self) -> dict:
        return {names.LABEL_KVM: "true" if vmm.kvm_status()[0] else "false"}

    def status(self, vouch: bool = True) -> dict:
        """This node's status fields; `lastHeartbeatTime` only when the worker vouches for it."""
        runtime = self.ctx.runtime
        status = {
            "capacity": host_capacity(self.settings.capacity_vcpus, self.settings.capacity_memory_mib),
            "vmms": runtime.available_vmms(),
            "defaultVmm": runtime.default_vmm(),
            "kvm": vmm.kvm_status()[0],
            "lastHeartbeatTime": conditions.now(),
            "workerVersion": mikrom.__version__,
        }
        if not vouch:
            del status["lastHeartbeatTime"]
        return status

    def register(self, vouch: bool = True) -> dict:
        """Create this node's MicroVMNode if it is missing, label it, and heartbeat once."""
        body = {"apiVersion": names.API_VERSION, "kind": "MicroVMNode",
                "metadata": {"name": self.node, "labels": self.labels()}, "spec": {"schedulable": True}}
        try:
            kube.custom().create_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES, body,
                                                       _request_timeout=kube.TIMEOUT)
            how = "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
            kube.custom().patch_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES, self.node,
                                                      {"metadata": {"labels": self.labels()}},
                                                      _request_timeout=kube.TIMEOUT)
            how = "exists"
        node = self.heartbeat(vouch)
        log.info("registered MicroVMNode %s (%s)", self.node, how)
        return node

    def heartbeat(self, vouch: bool = True) -> dict:
        node = kube.patch_node_status(self.node, self.status(vouch))
        if node is None:  # deleted under us: register again
            return self.register(vouch)
        self.cidr = (node.get("spec") or {}).get("cidr") or self.cidr
        return node

    def node_cidr(self) -> str | None:
        """The node's address block; read again while the operator has not assigned one."""
        if not self.cidr:
            node = kube.get_node(self.node)
            self.cidr = ((node or {}).get("spec") or {}).get("cidr")
        return self.cidr

    # ------------------------------------------------------------------------------ loops

    def start(self) -> None:
        for target, name in ((self._heartbeat_loop, "mikrom-heartbeat"), (self._sync_loop, "mikrom-sync")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self.stopping.set()
        self.sync_wanted.set()
        self.peers.forget()

    def _heartbeat_loop(self) -> None:
        registered = False
        rounds = 0  # heartbeat rounds this process has completed: the first one vouches for nothing
        while not self.stopping.is_set():
            settled = rounds > 0
            gap = False
            # the lease counts from before the write: the operator's view is never older than that
            sent = lease.boottime()
            api_ok = False
            try:
                node = self.heartbeat(settled) if registered else self.register(settled)
                registered = True
                api_ok = True
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any API failure
                log.warning("heartbeat of %s failed: %s", self.node, exc)
            try:
                self._renew_lease(api_ok, sent, settled)
            except Exception as exc:  # noqa: BLE001 - an unrenewed lease fences; the loop goes on
                log.error("fence lease round of %s failed: %s", self.node, exc)
            rounds += 1
            if settled or not api_ok:  # adoption waits for the round that may renew the lease
                self.first_round.set()
            try:
                if not api_ok:
                    # the supervisors stop their VMMs when the lease runs out; this worker follows a
                    # little later, for a supervisor that predates the lease or did not manage it
                    if not self.fenced and self.settings.self_fence_after_seconds > 0 and should_fence(
                            self.last_renewed, lease.boottime(),
                            self.settings.self_fence_after_seconds + self.settings.fence_kill_after_seconds + 1):
                        self.fence()
                    self.stopping.wait(self.settings.heartbeat_seconds)
                    continue
                gap = self.fenced or time.monotonic() - self.last_ok > 2.5 * self.settings.heartbeat_seconds
                self.last_ok = time.monotonic()
                self.heartbeats += 1
                if self.fenced:
                    log.warning("heartbeat renewed after self-fencing; VMs still assigned here start again")
                    self.fenced = False
                if gap and lease.absorb_fences(self.ctx.runtime.vms_dir):
                    self.sync_wanted.set()
                ready = conditions.is_true((node.get("status") or {}).get("conditions"), names.READY)
                if gap or (ready and self._was_ready is False):
                    # back from a gap, or the operator saw the node again after calling it lost:
                    # its VMs are Unknown until we report them
                    self.sync_wanted.set()
                self._was_ready = ready
            except Exception as exc:  # noqa: BLE001
                log.warning("heartbeat of %s: %s", self.node, exc)
            self.stopping.wait(self.settings.heartbeat_seconds)

    def _renew_lease(self, api_ok: bool, sent: float, settled: bool = True) -> None:
        """Tell the peers how this round went and renew the lease if fence.decide() allows."""
        s = self.settings
        verdict = fencing.decide(api_ok, self.node, self.peers.exchange(api_ok), s.fence_peer_window_seconds,
                                 settled=settled)
        if verdict.reason != (self.verdict.reason if self.verdict else None):
            (log.info if verdict.reason in ("ApiReachable", "Starting") else log.warning)(
                "fence lease of %s: %s, %s (%s)", self.node, "renewing" if verdict.renew else "not renewing",
                verdict.reason, verdict.message)
        self.verdict = verdict
        ttl, why = s.self_fence_after_seconds, verdict.reason
        if ttl <= 0:
            # fencing is off: a lease that never runs out, so one left by an earlier setting fences nothing
            ttl, why = FENCING_OFF_TTL, "FencingDisabled"
        elif not verdict.renew:
            return
        start = sent if api_ok else lease.boottime()
        try:
            lease.renew(self.ctx.runtime.vms_dir, start + ttl, self.node, why,
                        ttl=ttl, kill_after=s.fence_kill_after_seconds)
            self.last_renewed = start
        except OSError as exc:
            log.error("cannot renew the fence lease of %s: %s", self.node, exc)

    def _sync_loop(self) -> None:
        first = True
        # adoption and starts wait for the first lease renewal (bounded: the sync must run anyway)
        self.first_round.wait(FIRST_ROUND_WAIT)
        while not self.stopping.is_set():
            try:
                lease.absorb_fences(self.ctx.runtime.vms_dir)
                summary = maintenance.sync_node(self.ctx, lock_timeout=0.5 if not first else 30.0)
                if first:
                    log.info("startup sync (adoption) of %s: %s", self.node, summary)
                first = False
            except Exception as exc:  # noqa: BLE001
                log.warning("sync of %s failed: %s", self.node, exc)
            self.sync_wanted.wait(self.settings.sync_interval_seconds)
            self.sync_wanted.clear()

    def fence(self) -> None:
        """Stop every VM on this node: the lease ran out (the operator has not heard from us for
        too long), so it may already be recreating them elsewhere. The supervisors have stopped
        their VMMs by themselves by now; this covers a supervisor that predates the lease."""
        self.fenced = True
        runtime = self.ctx.runtime
        uids = local_uids(runtime.vms_dir)
        log.error("fence lease not renewed for %.0fs: self-fencing, stopping %d VM(s)",
                  self.settings.self_fence_after_seconds, len(uids))
        for uid in uids:
            local = runtime.local(uid)
            if local.pid() is None:
                continue
            try:
                with self.ctx.locks.hold(uid, timeout=self.settings.stop_timeout_seconds):
                    local.update_meta(desiredStop=True, fenced=True)
                    runtime.stop(local, timeout=FENCE_STOP_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - fence the others anyway
                log.error("self-fencing could not stop %s: %s", uid, exc)
