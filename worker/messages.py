"""Whether a VM task's message describes a real MicroVM, before the node does anything for it.

Anyone who can write to Redis can put a message on a node's queue, so a message is a claim, not a
fact: `{namespace, name, uid}` must all match the object the API server holds, or the message is
dropped (with a log line) and the node touches nothing. In particular a message never removes
what the node holds for a uid: a VM whose object is gone is an orphan, and orphans are removed by
the level-triggered `cleanup_old_vms` (age-filtered, from the API server's list), not on a
message's word. Deletion still works through messages because the operator's finalizer keeps the
object (with its deletionTimestamp) until the node confirms with `status.cleanedUpAt`.
"""

from __future__ import annotations

from collections.abc import Callable

GENERIC = "the message does not match a MicroVM"
"""What the sender learns (the task's result): nothing about which objects exist."""


def mismatch(namespace: str, name: str, uid: str, vm: dict | None, recorded: Callable[[], dict]) -> str | None:
    """Why the message (namespace, name, uid) must be dropped, or None when it names object `vm`.

    `vm` is the object read by the message's namespace and name (None: there is none);
    `recorded()` returns what this node wrote when it first started the VM of that uid (meta.json:
    its namespace and name), empty if the node holds nothing for it; it is called only once the
    uid is known to be a real object's, so a forged uid never reaches the file system.
    """
    if vm is None:
        return f"no MicroVM {namespace}/{name}"
    meta = vm.get("metadata") or {}
    if meta.get("uid") != uid:
        return f"MicroVM {namespace}/{name} is another object (its uid differs from the message's)"
    if (meta.get("namespace"), meta.get("name")) != (namespace, name):
        return f"the object read for {namespace}/{name} is {meta.get('namespace')}/{meta.get('name')}"
    held = recorded()
    if held.get("namespace") and (held.get("namespace"), held.get("name")) != (namespace, name):
        return f"this node holds uid {uid} for {held.get('namespace')}/{held.get('name')}, not {namespace}/{name}"
    return None
