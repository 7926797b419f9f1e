"""Waiting for a create's placement to be recorded (docs/protocol.md, Dispatch).

The operator sends a new VM's create just before it writes `status.node`, so the message may
arrive while the object names no node yet. The handover rule still holds (once the operator set
`status.node`, only that node acts on the VM; before, none does): the task does not act, it waits
for the write, watching that one object from the resourceVersion it read, for at most
`placementWaitSeconds`. The watch is the kubernetes client's blocking HTTP stream, which under the
worker's gevent monkey-patching parks only the task's greenlet.

A create of a VM the node holds nothing for does not wait idle: its preparation (address, tap,
policy entry, images, the VMM's uid and host cgroup, the launcher forked ahead) runs meanwhile, and
only the guarded Provisioning write, which confirms the placement, waits for it (`Pending`). Nothing
starts and nothing is written before the placement names this node; a placement elsewhere, none
in time, or the object gone, and what was prepared is removed again.
"""

from __future__ import annotations

import logging
import math
import threading
import time

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from mikrom import kube, names

from . import timing

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


def node_of(vm: dict | None) -> str:
    return ((vm or {}).get("status") or {}).get("node") or ""


def settled(vm: dict | None) -> bool:
    """The operator has recorded the object's placement (or it is being deleted). kopf's finalizer
    follows in a patch of its own; the worker's first write does not wait for it (its guard
    tests the status and generation, not the resourceVersion: worker/status.py)."""
    return bool(node_of(vm)) or bool(((vm or {}).get("metadata") or {}).get("deletionTimestamp"))


def wait_for_node(vm: dict, timeout: float) -> dict | None:
    """`vm` as it is once it is `settled`, or as last seen when `timeout` seconds passed without
    that; None when the object went or a namesake replaced it meanwhile."""
    meta = vm["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    deadline = time.monotonic() + timeout
    while not settled(vm):
        left = deadline - time.monotonic()
        if left <= 0:
            return vm
        seen = _watch(vm, left)
        if seen is False:  # the watch could not go on from that version: read the object again
            seen = kube.get_vm(namespace, name)
        if seen is None or seen["metadata"].get("uid") != uid:
            return None
        vm = seen
    return vm


class NotPlacedHere(Exception):
    """The create's VM was not placed on this node after all (placed elsewhere, on no node in
    time, or gone): the message is dropped, and the node holds nothing for it."""


class Pending:
    """The placement a create on this node's queue is waiting for: `resolve` waits for it once
    (wait_for_node) and returns the object as placed on this node, or raises NotPlacedHere."""

    def __init__(self, vm: dict, node: str, timeout: float):
        self.vm, self.node, self.timeout = vm, node, timeout
        self._placed: dict | None = None

    def resolve(self) -> dict:
        if self._placed is None:
            placed = wait_for_node(self.vm, self.timeout)
            timing.mark("placed")
            node = node_of(placed)
            if placed is None:
                raise NotPlacedHere("the MicroVM went while waiting for its placement")
            if not node:
                raise NotPlacedHere(f"no node recorded for it within placementWaitSeconds ({self.timeout:g}s)")
            if node != self.node:
                raise NotPlacedHere(f"placed on another node ({node})")
            self._placed = placed
        return self._placed


class _Watch(watch.Watch):
    """The client's watch for a list call: the stock one finds the name of the call's watch
    argument by parsing its docstring, each time (about 2 ms of CPU, on the create's path)."""

    def get_watch_argument_name(self, func):
        return "watch"


def _watch(vm: dict, left: float) -> dict | None | bool:
    """Watch the object from `vm`'s resourceVersion until it names a node or `left` seconds pass:
    the last version seen, None when deleted, False when the watch broke off (expired version)."""
    meta = vm["metadata"]
    w = _Watch()
    deadline = time.monotonic() + left
    listing = client.CustomObjectsApi(kube.watch_api()).list_namespaced_custom_object
    try:
        for event in w.stream(listing, names.GROUP, names.VERSION, meta["namespace"], names.MICROVMS,
                              field_selector=f"metadata.name={meta['name']}", resource_version=meta.get("resourceVersion"), allow_watch_bookmarks=False,
                              timeout_seconds=max(1, math.ceil(left)),
                              _request_timeout=(CONNECT_TIMEOUT, left + CONNECT_TIMEOUT)):
            kind, obj = event.get("type"), event.get("object")
            if kind == "ERROR" or not isinstance(obj, dict):
                return False
            if kind == "DELETED":
                return None
            vm = obj
            if settled(vm) or obj["metadata"].get("uid") != meta["uid"] or time.monotonic() >= deadline:
                return vm
    except ApiException as exc:
        if exc.status != 410:  # 410 Gone: the version is too old to watch from
            raise
        return False
    finally:
        w.stop()
        # that closed the watch's connection: connect another for the next one, off its path
        threading.Thread(target=kube.warm_watch_connection, name="warm-watch", daemon=True).start()
    return vm
