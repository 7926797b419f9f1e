"""MicroVMNodes at work: each node's periodic check writes its Ready condition and status counts
(judged by the pure `health` module) and condition NodeCordoned (its Kubernetes Node's cordon, from
`cordons`), and, when its health changes, reconciles its VMs (Unknown while it is lost, reachable
again when it returns, rescheduled past the self-fence margin).

Before judging, a probe lists the MicroVMNodes from the API server, at most once per check
interval for all nodes: the heartbeats it reads are current whatever became of the watch, and a
failed list tells the heartbeat clock that the operator is blind (`heartbeats`: no heartbeat
ages while the operator cannot see, and ages count from when it can see again). So does a long
gap in which no heartbeat was looked at: the operator itself was frozen or starved.
"""

from __future__ import annotations

import logging
import threading
import time

from mikrom import conditions, kube, names

from . import cordons, sweep, vms
from .heartbeats import BEATS
from .health import UNREACHABLE_EXEMPT, health, status_patch
from .state import SETTINGS, STATE
from .status import emit

log = logging.getLogger(__name__)

_last_prune = [0.0]
_last_probe = [float("-inf")]
_probe_lock = threading.Lock()
PROBE_TIMEOUT = (3, 10)
"""connect, read: shorter than other calls, so a hanging API server counts as blindness well
before a lost node's VMs are due to move; long enough that a merely slow one does not."""


def frozen_after(interval: float) -> float:
    """A gap this long with no heartbeat looked at means the operator was not running meanwhile
    (a node is checked every `interval`, and a hanging probe holds up only its own thread)."""
    return 3 * interval + 10


def check_interval() -> float:
    """How often each node is checked: often enough that a lost node's VMs are Unknown well within
    nodeLostAfterSeconds + 10 s."""
    return max(0.5, min(SETTINGS.reconcile_interval_seconds, SETTINGS.node_lost_after_seconds / 4, 5.0))


BEATS.frozen_after = frozen_after(check_interval())


def reconcile(body: dict) -> None:
    """Check one node: its Ready condition, its status counts, and its VMs' reachability."""
    name = body["metadata"]["name"]
    STATE.observe_node(body)
    STATE.touch("node", name)
    probe()
    node = STATE.node(name) or body
    now = time.time()
    lost_after = SETTINGS.node_lost_after_seconds
    h = health(node, now, lost_after, BEATS.observe(node, now, lost_after))
    was = conditions.get((node.get("status") or {}).get("conditions"), names.READY)
    patch = status_patch(node, STATE.allocated().get(name, (0, 0, 0)), h)
    patch = _cordon_condition(node, patch)
    if patch:
        result = kube.patch_node_status(name, patch)
        if result is not None:
            STATE.observe_node(result)
    if was is None or (was.get("status") == "True") != h.ready:
        on_node = STATE.vms_on(name)
        if h.ready:
            emit(node, "NodeReady", f"{h.message}; {len(on_node)} MicroVMs on it")
            STATE.wake()
        elif was is not None or on_node:
            emit(node, h.reason, f"{h.message}; its {len(on_node)} MicroVMs are Unknown until it returns",
                 warning=True)
    for vm in STATE.vms_on(name):
        st = vm.get("status") or {}
        if h.ready:
            needs = conditions.get(st.get("conditions"), names.NODE_REACHABLE) is not None and \
                not conditions.is_true(st.get("conditions"), names.NODE_REACHABLE)
        else:
            needs = st.get("phase") not in UNREACHABLE_EXEMPT and not vm["metadata"].get("deletionTimestamp")
        if needs:
            try:
                vms.reconcile(vm, cause="node")
            except Exception as exc:  # noqa: BLE001 - one VM must not stop the others; the sweep retries
                log.warning("node %s: could not update MicroVM %s/%s: %s", name, vm["metadata"].get("namespace"),
                            vm["metadata"].get("name"), exc)
    _maybe_prune()


def probe() -> None:
    """List the MicroVMNodes (once per check interval, whichever node check comes first) into the
    operator's view, and tell the heartbeat clock whether the operator can see."""
    if time.monotonic() - _last_probe[0] < check_interval() or not _probe_lock.acquire(blocking=False):
        return
    try:
        _last_probe[0] = time.monotonic()
        try:
            listed = kube.custom().list_cluster_custom_object(names.GROUP, names.VERSION, names.MICROVMNODES,
                                                              _request_timeout=PROBE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - whatever the cause, the operator cannot see
            if BEATS.blind(time.time(), SETTINGS.node_lost_after_seconds):
                log.warning("cannot list MicroVMNodes (%s): no node's heartbeat ages until the operator can "
                            "read the API server again", exc)
            return
        for item in listed.get("items") or []:
            STATE.observe_node(item)
        blind_for = BEATS.sighted(time.time())
        if blind_for is not None:
            log.warning("the API server can be read again after %.0fs: heartbeat ages count from now", blind_for)
    finally:
        _probe_lock.release()


def _cordon_condition(node: dict, patch: dict | None) -> dict | None:
    """Add condition NodeCordoned to the node's status patch when the Kubernetes Node of the same
    name is cordoned, or was (then False); record an Event when it turns."""
    name = node["metadata"]["name"]
    why = cordons.why(name)
    current = (patch or {}).get("conditions", (node.get("status") or {}).get("conditions"))
    if not why and conditions.get(current, cordons.CONDITION) is None:
        return patch
    text = f"{why}: no new MicroVMs are placed here; running ones stay" if why else \
        f"Node {name} is schedulable again"
    new, changed = conditions.set_condition(current, cordons.CONDITION, bool(why),
                                            "NodeUnschedulable" if why else "NodeSchedulable", text)
    if not changed:
        return patch
    emit(node, cordons.CONDITION if why else "NodeUncordoned", text)
    return {**(patch or {}), "conditions": new}


def _maybe_prune() -> None:
    now = time.monotonic()
    if now - _last_prune[0] < 30:
        return
    _last_prune[0] = now
    period = max(120.0, 10 * SETTINGS.reconcile_interval_seconds)
    stale = STATE.prune(period) + sweep.maybe_prune_vms(period)
    if stale:
        log.info("forgot %d objects no longer served: %s", len(stale), ", ".join(stale[:10]))
