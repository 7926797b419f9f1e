"""The node-side "make it so" for one VM.

`decide()` is pure: from the MicroVM (desired state and what status says) and the node's
`Observation` (state directory and live process) it picks one action. `Reconciler` carries the
action out with the runtime and reports through the status writer. Every task and the periodic
sync end up here, under the VM's lock, so a duplicated or stale message does no harm: the object is
re-read and the node is compared with it, whatever the message's intent said.

Run strategies (as KubeVirt's): Always restarts a VM whenever it stops; RerunOnFailure restarts
it unless the guest powered off cleanly (then Succeeded); Once never restarts (Succeeded or
Failed); Halted keeps it stopped. Restarts after a crash back off exponentially.
"""

from __future__ import annotations

import datetime as _dt
import enum
import logging
import time
from dataclasses import dataclass

from mikrom import kube, metrics, names
from mikrom.names import Phase, RunStrategy

from . import concurrently, images, ipalloc, lease, placement_wait, runtime as rt, timing, vmm
from .state import LocalVM, Observation
from .status import ObjectChanged

log = logging.getLogger(__name__)
# A start launched later than this before the end of the lease it was decided under confirms its
# placement again first (see VMSpec.start_before): the supervisor would refuse it otherwise.
RECONFIRM_BEFORE = 2.0

PERMANENT_REASONS = frozenset({names.INVALID_SPEC, names.CHECKSUM_MISMATCH, "ImageTooLarge", "VMMUnavailable"})
"""Failures that repeating cannot fix: sticky until the spec (generation) or restartedAt changes."""
PERMANENT_ERRORS = (images.ImageRefused, images.ChecksumMismatch, images.ImageTooLarge, rt.VMMUnavailable)
RESTART_BACKOFF_BASE = 5.0
RESTART_BACKOFF_CAP = 300.0
CRASH_RESET_AFTER = 600.0
"""A run that lasted this long resets the crash counter (and so the backoff)."""
MAX_DECISIONS = 4
"""Times one reconcile decides again because the object changed under a guarded write."""


class VMGone(Exception):
    """The MicroVM was deleted, or replaced by a namesake, while the node worked on it."""


class Action(str, enum.Enum):
    START = "start"
    RESTART = "restart"
    STOP = "stop"
    WAIT_READY = "wait-ready"
    REPORT_RUNNING = "report-running"
    REPORT_STOPPED = "report-stopped"
    FINISH = "finish"
    BACKOFF = "backoff"
    NOTHING = "nothing"


@dataclass
class Decision:
    action: Action
    delay: float = 0.0
    why: str = ""


def restart_delay(crashes: int) -> float:
    """Seconds to wait before restarting after the `crashes`-th consecutive unplanned exit."""
    if crashes <= 0:
        return 0.0
    return min(RESTART_BACKOFF_CAP, RESTART_BACKOFF_BASE * 2 ** (crashes - 1))


def restart_annotation(vm: dict) -> str | None:
    return (vm.get("metadata", {}).get("annotations") or {}).get(names.ANNOTATION_RESTARTED_AT)


def decide(vm: dict, obs: Observation, now: float) -> Decision:
    spec = vm.get("spec") or {}
    status = vm.get("status") or {}
    strategy = spec.get("runStrategy") or RunStrategy.ALWAYS.value
    wanted_restart = restart_annotation(vm)
    acted_restart = status.get("restartedAt") or obs.meta.get("restartedAt")
    restart_pending = bool(wanted_restart) and wanted_restart != acted_restart

    if strategy == RunStrategy.HALTED.value:
        return Decision(Action.STOP if obs.running else Action.REPORT_STOPPED, why="runStrategy Halted")
    if obs.running:
        if not obs.supervised:
            return Decision(Action.RESTART, why="the VMM lost its supervisor (nothing drains its console or "
                                                "enforces its fence): restarting it under a new one")
        if restart_pending:
            return Decision(Action.RESTART, why=f"{names.ANNOTATION_RESTARTED_AT} is {wanted_restart}")
        return Decision(Action.REPORT_RUNNING if obs.ready else Action.WAIT_READY)
    if (status.get("phase") == Phase.FAILED.value and status.get("reason") in PERMANENT_REASONS
            and status.get("observedGeneration") == vm["metadata"].get("generation") and not restart_pending):
        return Decision(Action.NOTHING, why=f"failed permanently ({status.get('reason')}) for this generation")
    if obs.exited and not obs.meta.get("desiredStop"):
        if strategy == RunStrategy.ONCE.value or (strategy == RunStrategy.RERUN_ON_FAILURE.value and obs.exit_clean):
            return Decision(Action.FINISH, why=f"runStrategy {strategy}")
        if not restart_pending:
            wait = restart_delay(int(obs.meta.get("crashes", 0))) - (now - (obs.exit_at or now))
            if wait > 0:
                return Decision(Action.BACKOFF, delay=wait, why=f"crash {obs.meta.get('crashes', 0)}")
        return Decision(Action.START, why=f"runStrategy {strategy} after the VMM exited")
    if (strategy == RunStrategy.ONCE.value and status.get("phase") in (Phase.SUCCEEDED.value, Phase.FAILED.value)
            and status.get("finishedAt") and not restart_pending):
        return Decision(Action.NOTHING, why="runStrategy Once has run")
    return Decision(Action.START, why="no VMM runs")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Reconciler:
    """Carries out decisions for the VMs assigned to this node (see WorkerContext)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.runtime: rt.Runtime = ctx.runtime
        self.writer = ctx.writer

    # ------------------------------------------------------------------------------ entry points

    def reconcile_locked(self, namespace: str, name: str, uid: str, lock_timeout: float,
                         known: dict | None = None, pending: placement_wait.Pending | None = None) -> str:
        """`reconcile` under the VM's lock; the lock file goes once nothing is left for the VM."""
        with self.ctx.locks.hold(uid, timeout=lock_timeout) as held:
            timing.mark("lock")
            try:
                return self.reconcile(namespace, name, uid, known=known, pending=pending)
            finally:
                held.remove = not self.runtime.local(uid).exists()

    def reconcile(self, namespace: str, name: str, uid: str, known: dict | None = None,
                  pending: placement_wait.Pending | None = None) -> str:
        """Make the node match MicroVM namespace/name (if it is still object `uid`).

        `known` is the object as the caller read it a moment ago (a task checking its message), so
        it is not read again: what the node does from it is checked by the first status write of
        each action (a guarded write, see StatusWriter.report), and decided again from the fresh
        object if the object changed in between. The one action that writes nothing first,
        removing what the node holds for a VM assigned elsewhere, is never taken from `known`.

        With `pending` (a create sent just before its placement was recorded; `known` is the object
        as it was before) nothing is acted on before the placement names this node: a new VM is
        prepared meanwhile (see _start), anything else waits for it first. NotPlacedHere, with the
        node holding nothing for the VM, if it is not placed here after all.
        """
        vm = known
        if pending is not None:
            return self.reconcile_object(vm, pending)
        if vm is None or (vm.get("status") or {}).get("node") != self.ctx.node:
            vm = kube.get_vm(namespace, name)
            timing.mark("get_again")
        if vm is None or vm["metadata"]["uid"] != uid:
            return "gone; removed what this node held" if self.runtime.teardown(uid) else "gone"
        return self.reconcile_object(vm)

    def reconcile_object(self, vm: dict, pending: placement_wait.Pending | None = None) -> str:
        for attempt in range(1, MAX_DECISIONS + 1):
            try:
                return self._reconcile_once(vm, pending)
            except ObjectChanged as changed:
                pending = None  # the fresh object is the placed one
                if attempt == MAX_DECISIONS:
                    raise
                log.info("%s/%s changed while being acted on; deciding again", changed.fresh["metadata"]["namespace"],
                         changed.fresh["metadata"]["name"])
                vm = changed.fresh
        raise AssertionError("unreachable")

    def _reconcile_once(self, vm: dict, pending: placement_wait.Pending | None = None) -> str:
        uid = vm["metadata"]["uid"]
        early = self._prepare_early(vm, pending)
        if pending is not None and early is None:
            vm = pending.resolve()  # nothing is acted on before the placement names this node
        status = vm.get("status") or {}
        if early is None and status.get("node") != self.ctx.node:
            if self.runtime.teardown(uid):
                return f"assigned to {status.get('node') or 'no node'}; removed what this node held"
            return f"assigned to {status.get('node') or 'no node'}; nothing to do"
        try:
            if vm["metadata"].get("deletionTimestamp"):
                return self._delete(vm)
            local = self.runtime.local(uid)
            obs = self._record_exit(local, local.observe())
            decision = early or decide(vm, obs, time.time())
            log.info("%s/%s (%s): %s %s%s", vm["metadata"]["namespace"], vm["metadata"]["name"], uid,
                     decision.action.value, decision.why, " (prepared while its placement is recorded)" if early else "")
            if early is not None:
                return self._start(vm, local, obs, decision, pending=pending)
            handler = getattr(self, "_" + decision.action.value.replace("-", "_"))
            return handler(vm, local, obs, decision) or decision.action.value
        except VMGone:
            # deleted (or replaced by a namesake) while we worked on it: leave nothing behind
            self.runtime.teardown(uid)
            return "gone; removed what this node held"

    def _prepare_early(self, vm: dict, pending: placement_wait.Pending | None) -> Decision | None:
        """With a placement still `pending`, the decision to start a VM this node holds nothing
        for (whose preparation then runs while the placement is recorded); None for anything
        else, which waits for the placement before it is decided."""
        if pending is None or vm["metadata"].get("deletionTimestamp"):
            return None
        local = self.runtime.local(vm["metadata"]["uid"])
        if local.exists():
            return None
        decision = decide(vm, local.observe(), time.time())
        return decision if decision.action is Action.START else None

    # ------------------------------------------------------------------------------ actions

    def _start(self, vm, local: LocalVM, obs: Observation, decision: Decision, event_reason: str | None = None,
               pending: placement_wait.Pending | None = None):
        """Provisioning, then the VMM, then Running once the guest is up.

        What the VMM needs is made at the same time: the Provisioning write (guarded: it fails if
        the object changed since the decision was made, and the VM is decided again), the
        address and tap, the VMM's uid and host cgroup (with the VM's launcher forked ahead into
        it, waiting for the launch), and the images (checked, downloaded, the VM's own rootfs
        copied). All end before anything else happens, and the VMM starts only if all succeeded
        (otherwise the waiting launcher exits having started nothing). A VM that never ran loses
        what the other steps made when its images fail, so a refused or corrupt image leaves
        nothing behind on the node. The tap's policy entry is made while the VMM starts: the tap
        drops everything until then, and the VM is Running only once it is in place.

        With `pending` the Provisioning write first waits for the placement (the other steps go on
        meanwhile), and is made on the object as placed, provided that it would still be started
        as decided (ObjectChanged otherwise); not placed here, and what the other steps made is
        removed (NotPlacedHere).
        """
        spec = vm["spec"]
        vmm_name = spec.get("vmm") or self.runtime.default_vmm()
        try:
            self.runtime.driver(vmm_name)
        except PERMANENT_ERRORS as exc:
            return self._fail(self._placed(vm, obs, pending), local, exc.reason, str(exc), terminal=True)
        configured = obs.configured
        local.update_meta(namespace=vm["metadata"]["namespace"], name=vm["metadata"]["name"], uid=local.uid,
                          vmm=vmm_name, desiredStop=False, fenced=False,
                          createdAt=local.read_meta().get("createdAt") or time.time(),
                          restartedAt=restart_annotation(vm))
        deferred: list = []
        # the lease as it stands before the guarded write that confirms the placement: the VMM may
        # start only under it (see VMSpec.start_before), not under one renewed after a stall
        start_before = lease.deadline(self.runtime.vms_dir)
        # in the order they start: the launcher staged first (its cgroup join is the longest
        # wait), the network next, whose address and tap commands are the longest chain, then the
        # write, whose request is the most work for this process before it waits (the images run
        # last, in this greenlet, and are quick)
        vcpus, memory_mib = int(spec.get("vcpus", 1)), int(spec.get("memoryMiB", 512))
        steps = {"vmm": lambda: self._vmm(vmm_name, local, vcpus, memory_mib)}
        if spec.get("network"):
            steps["network"] = lambda: self._network(vm, local, vmm_name)
        steps["provisioning"] = lambda: self._write(self._placed(vm, obs, pending), Phase.PROVISIONING.value,
                                                    "Provisioning", f"starting on {self.ctx.node}",
                                                    {"vmm": vmm_name}, guard=True, defer_events=deferred)
        steps["claim"] = concurrently.in_os_thread(lambda: self.runtime.prepare_vmm(vmm_name, local))
        steps["images"] = lambda: self._images(spec, local)
        out = concurrently.run(**steps)
        timing.mark("prepared")
        staged = out.results.get("vmm")
        if staged is not None and out.errors:
            staged.close()  # no launch: the launcher waiting in the VM's group exits having started nothing
        try:
            return self._launch_prepared(vm, local, out, configured, deferred, start_before, staged, vmm_name,
                                         event_reason)
        finally:
            if staged is not None:
                staged.close()

    def _launch_prepared(self, vm, local: LocalVM, out, configured: bool, deferred: list, start_before,
                         staged, vmm_name: str, event_reason: str | None):
        """The second half of a start: once every step of the preparation has ended, the VMM
        starts if they all succeeded (the Provisioning write among them) and is waited for."""
        if "provisioning" in out.errors:
            if isinstance(out.errors["provisioning"], placement_wait.NotPlacedHere):
                self.runtime.teardown(local.uid)  # all of it made for this start, before the placement
            raise out.errors["provisioning"]  # gone, changed (decided again) or the API server's trouble
        vm = out.results["provisioning"]
        failed = self._prepare_failed(vm, local, out, configured, deferred)
        if failed is not None:
            return failed
        address = out.results.get("network")
        if start_before is not None and lease.boottime() > start_before - RECONFIRM_BEFORE:
            # the preparation (a long download, or a stall) outlived the lease the start was
            # decided under: confirm the placement again under the lease as it stands now (a
            # guarded empty write: a VM moved or changed meanwhile is refused and decided again)
            start_before = lease.deadline(self.runtime.vms_dir)
            vm = self._write(vm, None, None, None, {}, guard=True)
        try:
            vmspec = self.runtime.build_spec(local, vm, out.results["images"], address)
            vmspec.start_before = start_before
            # the VM's policy entry is made while its VMM starts (Runtime.ensure_policy_entry: its
            # tap drops everything until then); the launch runs first, in this greenlet
            steps = {"policy": lambda: self.runtime.ensure_policy_entry(address)} if address else {}
            steps["launch"] = lambda: self.runtime.launch(local, vmspec, vmm_name, strays_reaped=True, staged=staged)
            started = concurrently.run(**steps)
            if "launch" in started.errors:
                raise started.errors["launch"]
            pid = started.results["launch"]
            timing.mark("launched")
            timing.mark_cpu("launched")
        except (vmm.VMMStartFailed, images.ImageRefused, images.ImageNotFound) as exc:
            self.writer.record_events(deferred)
            if isinstance(exc, vmm.VMMStartFailed):
                local.update_meta(lastReason=exc.reason)
                return self._fail(vm, local, exc.reason, str(exc))
            # the rootfs changed after it was resolved (replaced by a FIFO, a device, removed)
            return self._fail(vm, local, exc.reason, str(exc), terminal=isinstance(exc, images.ImageRefused))
        self.writer.record_events(deferred)  # the Provisioning Event, once the VMM is on its way
        if "policy" in started.errors:
            # a VM whose tap passes nothing is not Running: its VMM is stopped (on purpose, so not a
            # crash) and the error goes to the task, whose retry starts it again (as a network
            # step's error before the launch would)
            local.update_meta(desiredStop=True)
            self.runtime.stop(local, timeout=0)
            raise started.errors["policy"]
        log.info("%s/%s (%s): VMM started (pid %d)", vm["metadata"]["namespace"], vm["metadata"]["name"],
                 local.uid, pid)
        return self._await_ready(vm, local, event_reason)

    @staticmethod
    def _placed(vm: dict, obs: Observation, pending: placement_wait.Pending | None) -> dict:
        """The object the Provisioning write is made on: `vm`, or with `pending` the object as
        placed on this node, if it is still to be started as `vm` was (same spec and annotations;
        the operator's placement write and kopf's finalizer are all that came in between)."""
        if pending is None:
            return vm
        placed = pending.resolve()
        same = (placed["metadata"].get("generation") == vm["metadata"].get("generation")
                and placed.get("spec") == vm.get("spec")
                and (placed["metadata"].get("annotations") or {}) == (vm["metadata"].get("annotations") or {})
                and not placed["metadata"].get("deletionTimestamp")
                and decide(placed, obs, time.time()).action is Action.START)
        if not same:
            raise ObjectChanged(placed)
        return placed

    def _vmm(self, vmm_name: str, local: LocalVM, vcpus: int, memory_mib: int):
        """The VMM's host cgroup made, then its launcher forked ahead into it (Runtime.stage_launch):
        joining a group can wait an RCU grace period, which is then spent while the rest of the
        start (the Provisioning write above all) is still going. The launcher, or None. (Strays
        reaped and the VMM's uid claimed are the "claim" step.)

        The group is made in this greenlet: a few milliseconds of cgroupfs calls, none of which
        waits on a device. In an OS thread each of those calls would wait for the interpreter lock
        again while the hub runs the other steps, which stretched them to tens of milliseconds and
        the launcher's head start with them."""
        self.runtime.prepare_host_cgroup(vmm_name, local, vcpus, memory_mib)
        staged = self.runtime.stage_launch(vmm_name, local, vcpus, memory_mib)
        timing.mark("staged")
        return staged

    def _network(self, vm, local: LocalVM, vmm_name: str) -> rt.Address:
        cidr = self.ctx.node_cidr()
        address = self.runtime.allocate_address(local, cidr, (vm.get("status") or {}).get("ipAddress"))
        timing.mark("address")
        owner = self.runtime.tap_owner(vmm_name, local)
        self.runtime.ensure_network(cidr, address, tap_owner=owner)
        timing.mark("network")
        return address

    def _images(self, spec: dict, local: LocalVM) -> rt.Images:
        imgs = self.runtime.resolve_images(spec.get("image") or {})
        self.runtime.prepare_rootfs(local, imgs)
        timing.mark("images")
        return imgs

    def _prepare_failed(self, vm, local: LocalVM, out, configured: bool, deferred: list):
        """The outcome of a failed image, network or VMM step (as the status says it), None if all
        succeeded; raises what a retry of the task may fix."""
        exc = out.first_error("images", "network", "vmm", "claim")
        if exc is None:
            return None
        self.writer.record_events(deferred)
        if ("images" in out.errors or "vmm" in out.errors or "claim" in out.errors) and not configured:
            # never ran: remove the address, tap and directory the network step made meanwhile
            self.runtime.teardown(local.uid)
        if isinstance(exc, PERMANENT_ERRORS):
            return self._fail(vm, local, exc.reason, str(exc), terminal=True)
        if isinstance(exc, images.ImageDownloadFailed):
            self._fail(vm, local, exc.reason, f"{exc}; retrying")
            raise exc
        if isinstance(exc, (images.ImageNotFound, ipalloc.BlockExhausted)):
            return self._fail(vm, local, exc.reason, str(exc))
        if isinstance(exc, vmm.VMMStartFailed):  # no free uid in the sandbox range, no host cgroup
            local.update_meta(lastReason=exc.reason)
            return self._fail(vm, local, exc.reason, str(exc))
        raise exc

    def _restart(self, vm, local, obs, decision):
        vm = self._write(vm, Phase.STOPPING.value, "Restarting", decision.why, {}, guard=True)
        local.update_meta(desiredStop=True)
        self.runtime.stop(local)
        return self._start(vm, local, local.observe(), decision, event_reason="Restarted")

    def _wait_ready(self, vm, local, obs, decision):
        return self._await_ready(vm, local, "Adopted")

    def _report_running(self, vm, local, obs, decision):
        self._running(vm, local, obs, event_reason="Adopted")
        return "running"

    def _stop(self, vm, local, obs, decision):
        vm = self._write(vm, Phase.STOPPING.value, "Stopping", decision.why, {}, guard=True)
        local.update_meta(desiredStop=True)
        self.runtime.stop(local)
        return self._report_stopped(vm, local, obs, decision)

    def _report_stopped(self, vm, local, obs, decision):
        self._write(vm, Phase.STOPPED.value, "Stopped", "stopped (runStrategy Halted)", {"pid": None})
        return "stopped"

    def _finish(self, vm, local, obs, decision):
        fields = {"pid": None, "finishedAt": (vm.get("status") or {}).get("finishedAt") or iso(obs.exit_at)}
        if obs.exit_clean:
            self._write(vm, Phase.SUCCEEDED.value, "GuestPoweredOff", "the guest powered off", fields)
            return "succeeded"
        reason = obs.meta.get("lastReason") or names.VMM_EXITED
        self._write(vm, Phase.FAILED.value, reason, _exit_message(local), fields)
        return "failed"

    def _backoff(self, vm, local, obs, decision):
        reason = obs.meta.get("lastReason") or names.VMM_EXITED
        self._write(vm, Phase.FAILED.value, reason,
                    f"{_exit_message(local)}; restarting in {decision.delay:.0f}s (crash {obs.meta.get('crashes')})",
                    {"pid": None})
        if obs.meta.get("restartScheduled") != obs.started_at:  # once per crash, not once per sync
            self.ctx.schedule_restart(vm, decision.delay)
            local.update_meta(restartScheduled=obs.started_at)
        return f"backing off {decision.delay:.0f}s"

    def _nothing(self, vm, local, obs, decision):
        return "nothing to do"

    def _delete(self, vm) -> str:
        self.runtime.teardown(vm["metadata"]["uid"])
        if not (vm.get("status") or {}).get("cleanedUpAt"):
            self._write(vm, None, None, None, {"cleanedUpAt": iso(time.time()), "pid": None},
                        ready=(False, "Deleted", "the VM, its tap and its files are gone"),
                        event=("Normal", "CleanedUp", "the VM, its tap and its files are gone"))
        return "deleted"

    # ------------------------------------------------------------------------------ helpers

    def _await_ready(self, vm, local: LocalVM, event_reason: str | None):
        try:
            self.runtime.wait_ready(local)
            timing.mark("ready_seen")
        except vmm.BootTimeout as exc:
            local.update_meta(lastReason=exc.reason)
            self.runtime.stop(local, timeout=0)
            return self._fail(vm, local, exc.reason, _first_line(exc))
        except vmm.VMMExited as exc:
            local.update_meta(lastReason=exc.reason)
            return self._fail(vm, local, exc.reason, _first_line(exc))
        obs = local.observe()
        timing.mark("ready_observed")
        self._running(vm, local, obs, event_reason)
        return "running"

    def _running(self, vm, local: LocalVM, obs: Observation, event_reason: str | None):
        meta = obs.meta
        address = rt.Address(ip=meta["ip"], prefix=meta["prefix"], gateway=meta["gateway"], mac=meta["mac"],
                             tap=meta["tap"]) if meta.get("ip") else None
        fields = self._identity(meta.get("vmm"), address, obs.pid)
        started = vmm.spec_from_state(local.dir)  # the shape the VMM really has, whatever the spec says now
        fields.update(startedAt=iso(obs.started_at), bootSeconds=obs.boot_seconds, finishedAt=None,
                      restartedAt=meta.get("restartedAt"),
                      activeShape={"vcpus": started.vcpus, "memoryMiB": started.memory_mib})
        if meta.get("lastReason"):
            local.update_meta(lastReason=None)
        ip = f" at {address.ip}" if address else ""
        was = (vm.get("status") or {}).get("phase")
        self._write(vm, Phase.RUNNING.value, "Running",
                    f"running{ip} (pid {obs.pid}, booted in {obs.boot_seconds}s)", fields, event_reason=event_reason)
        timing.mark("running_write")
        if was != Phase.RUNNING.value and obs.boot_seconds is not None:
            metrics.BOOT_SECONDS.observe(obs.boot_seconds)  # each boot once, not each re-report

    @staticmethod
    def _identity(vmm_name, address, pid) -> dict:
        return {"vmm": vmm_name, "pid": pid, "ipAddress": address.ip if address else None,
                "macAddress": address.mac if address else None}

    def _fail(self, vm, local: LocalVM, reason: str, message: str, terminal: bool = False):
        fields = {"pid": None}
        if terminal:
            fields["finishedAt"] = (vm.get("status") or {}).get("finishedAt") or iso(time.time())
            if local.exists() and not local.observe().configured:
                local.remove()  # nothing ever ran: leave nothing behind
        self._write(vm, Phase.FAILED.value, reason, message, fields)
        return f"failed: {reason}"

    def _write(self, vm, phase, reason, message, fields, **kw) -> dict:
        """Report through the status writer; the object as written, or VMGone."""
        written = self.writer.report(vm, phase=phase, reason=reason, message=message, fields=fields, **kw)
        if written is None:
            raise VMGone(f"{vm['metadata']['namespace']}/{vm['metadata']['name']} ({vm['metadata']['uid']})")
        return written

    def _record_exit(self, local: LocalVM, obs: Observation) -> Observation:
        """Count an unplanned exit once (by the run's start time), for the restart backoff."""
        if not obs.exited or obs.meta.get("desiredStop") or obs.meta.get("exitSeen") == obs.started_at:
            return obs
        ran = (obs.exit_at or time.time()) - (obs.started_at or 0)
        crashes = 1 if ran >= CRASH_RESET_AFTER else int(obs.meta.get("crashes", 0)) + 1
        obs.meta = local.update_meta(crashes=crashes, exitSeen=obs.started_at,
                                     lastReason=obs.meta.get("lastReason") or names.VMM_EXITED)
        return obs


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _exit_message(local: LocalVM) -> str:
    tail = [line for line in vmm.console_tail(local.dir, 1024).splitlines() if line.strip()]
    last = f"; console: {tail[-1][:200]}" if tail else ""
    return f"the VMM exited{last}"
