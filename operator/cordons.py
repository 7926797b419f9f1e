"""Kubernetes Nodes cordoned (`kubectl cordon` or `drain`: `spec.unschedulable: true`) whose name
is a MicroVMNode's: placement takes no new VM there, as kube-scheduler takes no new Pod.

The user's own `MicroVMNode.spec.schedulable` is left alone: copying the cordon into it would
lose the user's choice at the uncordon (a node the user had set unschedulable would come back
schedulable) and fight whoever applies that spec. The cordon is observed state instead, kept
here from the Node watch and shown on the MicroVMNode as condition `NodeCordoned`
(`nodes.reconcile` writes it); placement honours both.

Thread-safe: kopf's index handler feeds it on the event loop, placement reads it from the thread pool.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

CONDITION = "NodeCordoned"
"""The MicroVMNode condition (and Event reason) that shows the Node's cordon."""

_lock = threading.Lock()
_cordoned: dict[str, str] = {}
"""Node name -> why placement avoids it."""


def message(name: str) -> str:
    return f"Node {name} is cordoned (spec.unschedulable, kubectl cordon or drain)"


def observe(body: Mapping) -> bool:
    """Remember whether the Node `body` is cordoned; True when that changed."""
    name = (body.get("metadata") or {}).get("name") or ""
    cordoned = bool((body.get("spec") or {}).get("unschedulable"))
    with _lock:
        was = name in _cordoned
        if cordoned:
            _cordoned[name] = message(name)
        else:
            _cordoned.pop(name, None)
    return was != cordoned


def forget(name: str) -> bool:
    """The Node is gone (a MicroVMNode without a Node is not cordoned); True when that changed."""
    with _lock:
        return _cordoned.pop(name, None) is not None


def why(name: str) -> str:
    """Why the node is cordoned, or ""."""
    with _lock:
        return _cordoned.get(name, "")
