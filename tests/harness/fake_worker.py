"""Plays the worker's part in the operator's integration tests, which need nodes that answer but no
VM boots (the e2e tests run the real worker through the same flows).

It does what docs/protocol.md says a worker does, against the real API server and the real Redis:
registers MicroVMNodes and renews their heartbeats; consumes its nodes' queues with kombu, so it
reads the real Celery message format (task name in the headers, `(args, kwargs, embed)` as the JSON
body); re-reads each MicroVM and patches its status (Provisioning, Running with an address from the
node's block, Stopping, Stopped, restartedAt, cleanedUpAt). It boots nothing. Every message it
takes is recorded, so tests can count them. A node can stop heartbeating or stop answering. A
create that arrives before its placement is recorded waits for `status.node`, as the real worker's
(`PLACEMENT_WAIT` seconds; docs/protocol.md, Dispatch).

Its status sync: by default each heartbeat re-reads the VMs a node runs (cheap for a test's few).
With `sync_seconds`, each node instead runs the real worker's selection every `sync_seconds`
(`mikrom.worker.maintenance.sync_targets`: one LIST of the node's VMs by field selector, plus the
VMs it runs that are not in it) and reads each VM once, as the real sync's reconcile does, so a
benchmark sees the API requests the real workers make.
"""

from __future__ import annotations

import json

import concurrent.futures
import datetime as _dt
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from kombu import Connection, Exchange, Queue
from kubernetes import client
from kubernetes.client.rest import ApiException

from mikrom import conditions, names
from mikrom.worker import maintenance

from .microvms import MicroVMClient
from .waits import WaitTimeout, wait_for

log = logging.getLogger(__name__)
T = (5, 30)  # connect, read timeout of every API call
G, V = names.GROUP, names.VERSION
PLACEMENT_WAIT = 10.0


@dataclass
class Message:
    node: str
    task: str
    kwargs: dict
    headers: dict
    body: object
    raw: str
    received_at: float


@dataclass
class FakeNode:
    name: str
    vcpus: int
    memory_mib: int
    labels: dict
    vmms: tuple
    answering: bool = True
    """Whether tasks are acted on (False: they are only recorded, as a hung worker)."""
    delete_delay: float = 0.0
    """Seconds between a delete task and the confirmation (status.cleanedUpAt)."""
    heartbeating: threading.Event = field(default_factory=threading.Event)
    clock_offset: float = 0.0
    """Seconds this node's clock is off (its heartbeat timestamps read that much later or earlier)."""
    running: dict = field(default_factory=dict)  # uid -> (namespace, name)
    addresses: dict = field(default_factory=dict)  # uid -> guest address


class FakeWorker:
    def __init__(self, kubeconfig: str, redis_url: str, heartbeat_seconds: float = 1.0, sync_seconds: float = 0.0,
                 threads: int = 8):
        from kubernetes import config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.connection_pool_maxsize = max(16, threads + 8)
        self._api = client.ApiClient(cfg)
        self.custom = client.CustomObjectsApi(self._api)
        self.cluster = MicroVMClient(self._api, "")
        """Reads and removes the MicroVMNodes (cluster-scoped: no namespace)."""
        self.redis_url = redis_url
        self.heartbeat_seconds = heartbeat_seconds
        self.sync_seconds = sync_seconds
        self.syncs: dict[str, int] = {}
        """Node name -> status syncs completed."""
        self.nodes: dict[str, FakeNode] = {}
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="fake-worker")
        self._sync_pool = concurrent.futures.ThreadPoolExecutor(maintenance.SYNC_PARALLEL,
                                                                thread_name_prefix="fake-worker-sync")
        self._spawn(self._heartbeat_loop, "heartbeat")

    # ------------------------------------------------------------------ nodes

    def add_node(self, name: str, vcpus: int = 4, memory_mib: int = 8192, labels: dict | None = None,
                 vmms=("qemu",), answering: bool = True, delete_delay: float = 0.0,
                 clock_offset: float = 0.0) -> FakeNode:
        node = FakeNode(name, vcpus, memory_mib, dict(labels or {}), tuple(vmms), answering, delete_delay,
                        clock_offset=clock_offset)
        body = {"apiVersion": names.API_VERSION, "kind": "MicroVMNode",
                "metadata": {"name": name, "labels": {names.LABEL_KVM: "true", **node.labels}},
                "spec": {"schedulable": True}}
        self.custom.create_cluster_custom_object(G, V, names.MICROVMNODES, body, _request_timeout=T)
        self.nodes[name] = node
        self._beat(node, full=True)
        node.heartbeating.set()
        self._spawn(lambda: self._consume(node), f"consume-{name}")
        if self.sync_seconds:
            self._spawn(lambda: self._sync_loop(node), f"sync-{name}")
        return node

    def stop_heartbeat(self, name: str) -> None:
        self.nodes[name].heartbeating.clear()

    def resume_heartbeat(self, name: str) -> None:
        node = self.nodes[name]
        self._beat(node)
        node.heartbeating.set()
        self._rereport(node)

    def _beat(self, node: FakeNode, full: bool = False) -> None:
        beat = _dt.datetime.fromtimestamp(time.time() + node.clock_offset, _dt.timezone.utc)
        status = {"lastHeartbeatTime": beat.strftime("%Y-%m-%dT%H:%M:%SZ")}  # by the node's own clock
        if full:
            status.update(capacity={"vcpus": node.vcpus, "memoryMiB": node.memory_mib}, vmms=list(node.vmms),
                          defaultVmm=node.vmms[0], kvm=False, workerVersion="fake")
        self.custom.patch_cluster_custom_object_status(G, V, names.MICROVMNODES, node.name, {"status": status},
                                                       _request_timeout=T)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            for node in list(self.nodes.values()):
                if node.heartbeating.is_set():
                    try:
                        self._beat(node)
                        self._rereport(node)
                    except Exception as exc:  # noqa: BLE001 - keep beating; the test sees the effect
                        log.warning("heartbeat of %s failed: %s", node.name, exc)

    def _rereport(self, node: FakeNode) -> None:
        """As a worker's status sync does: VMs it runs that read Unknown are reported again."""
        if not node.answering or self.sync_seconds:
            return
        for uid, (ns, name) in list(node.running.items()):
            self._sync_one(node, ns, name, uid)

    def _sync_one(self, node: FakeNode, ns: str, name: str, uid: str) -> None:
        vm = self._get(ns, name)
        st = (vm or {}).get("status") or {}
        if vm is None or vm["metadata"]["uid"] != uid:
            return
        if st.get("node") != node.name:
            node.running.pop(uid, None)  # placed elsewhere while this node was lost: let go
        elif st.get("phase") == "Unknown" and uid in node.running:
            self._patch(ns, name, uid, lambda cur: {"phase": "Running", "reason": "", "message": "running"})

    def _sync_loop(self, node: FakeNode) -> None:
        """The real worker's sync selection every `sync_seconds`, each VM read once (a hung node
        syncs nothing, as its tasks go unanswered)."""
        while not self._stop.wait(self.sync_seconds):
            if not node.answering or not node.heartbeating.is_set():
                continue
            try:
                held = {uid: {"namespace": ns, "name": name} for uid, (ns, name) in list(node.running.items())}
                targets = maintenance.sync_targets(node.name, held, api=self.custom)
                refs = [(t["metadata"]["namespace"], t["metadata"]["name"], t["metadata"]["uid"]) for t in targets]
                list(self._sync_pool.map(lambda r: self._sync_one(node, *r), refs))
                self.syncs[node.name] = self.syncs.get(node.name, 0) + 1
            except Exception as exc:  # noqa: BLE001 - the next round tries again, as the worker's does
                log.warning("sync of %s failed: %s", node.name, exc)

    # ------------------------------------------------------------------ messages

    def messages(self, node: str | None = None, uid: str | None = None, task: str | None = None) -> list[Message]:
        with self._lock:
            return [m for m in self._messages if (node is None or m.node == node)
                    and (uid is None or m.kwargs.get("uid") == uid) and (task is None or m.task == task)]

    def _consume(self, node: FakeNode) -> None:
        qname = names.node_queue(node.name)
        queue = Queue(qname, Exchange(qname, type="direct"), routing_key=qname)
        while not self._stop.is_set():
            try:
                with Connection(self.redis_url, connect_timeout=5,
                                transport_options={"socket_timeout": 5, "socket_connect_timeout": 5}) as conn:
                    with conn.Consumer(queue, callbacks=[lambda body, msg: self._on_message(node, body, msg)],
                                       accept=["json"]):
                        while not self._stop.is_set():
                            try:
                                conn.drain_events(timeout=0.5)
                            except (socket.timeout, TimeoutError):
                                pass
            except Exception as exc:  # noqa: BLE001 - Redis went away: reconnect, as a worker does
                log.info("consumer of %s reconnecting: %s", qname, exc)
                self._stop.wait(0.5)

    def _on_message(self, node: FakeNode, body, message) -> None:
        args, kwargs, _embed = body
        m = Message(node=node.name, task=message.headers["task"], kwargs=dict(kwargs), headers=dict(message.headers),
                    body=body, raw=message.body if isinstance(message.body, str) else message.body.decode(),
                    received_at=time.time())
        with self._lock:
            self._messages.append(m)
        message.ack()
        if node.answering:
            self._pool.submit(self._act, node, m)

    # ------------------------------------------------------------------ acting like the worker

    def _get(self, ns: str, name: str) -> dict | None:
        return MicroVMClient(self._api, ns).get(name)

    def _patch(self, ns: str, name: str, uid: str, compute) -> dict | None:
        """Merge-patch status with the uid and resourceVersion the patch was computed from."""
        for _ in range(10):
            vm = self._get(ns, name)
            if vm is None or vm["metadata"]["uid"] != uid:
                return None
            patch = compute(vm)
            if not patch:
                return vm
            body = {"metadata": {"uid": uid, "resourceVersion": vm["metadata"]["resourceVersion"]}, "status": patch}
            try:
                return self.custom.patch_namespaced_custom_object_status(G, V, ns, names.MICROVMS, name, body,
                                                                         _request_timeout=T)
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    return None
                raise
        raise RuntimeError(f"{ns}/{name}: status kept changing")

    def _act(self, node: FakeNode, m: Message) -> None:
        try:
            self._make_it_so(node, m.kwargs["namespace"], m.kwargs["name"], m.kwargs["uid"],
                             placement_wait=m.task == names.CREATE_VM)
        except Exception:  # noqa: BLE001
            log.exception("fake worker failed on %s", m.kwargs)

    def _make_it_so(self, node: FakeNode, ns: str, name: str, uid: str, placement_wait: bool = False) -> None:
        vm = self._get(ns, name)
        if placement_wait and vm is not None and vm["metadata"]["uid"] == uid and not (vm.get("status") or {}).get("node"):
            vm = self._placed(ns, name, uid)
        if vm is None or vm["metadata"]["uid"] != uid or (vm.get("status") or {}).get("node") != node.name:
            node.running.pop(uid, None)
            return
        if vm["metadata"].get("deletionTimestamp"):
            if node.delete_delay:
                self._stop.wait(node.delete_delay)  # a slow node: confirms a while after taking the task
            node.running.pop(uid, None)
            node.addresses.pop(uid, None)
            self._patch(ns, name, uid, lambda cur: {"cleanedUpAt": conditions.now(), "pid": None})
            return
        spec, status = vm["spec"], vm.get("status") or {}
        annotation = (vm["metadata"].get("annotations") or {}).get(names.ANNOTATION_RESTARTED_AT)
        if spec.get("runStrategy") == "Halted":
            if uid in node.running:
                self._patch(ns, name, uid, lambda cur: {"phase": "Stopping", "reason": "", "message": "stopping"})
                node.running.pop(uid, None)
            self._patch(ns, name, uid, lambda cur: {"phase": "Stopped", "reason": "", "message": "stopped",
                                                    "pid": None, "activeShape": None,
                                                    "conditions": self._ready(cur, False, "Stopped")})
            return
        restart = bool(annotation) and annotation != status.get("restartedAt")
        if uid in node.running and not restart and status.get("phase") == "Running":
            return
        if restart and uid in node.running:
            self._patch(ns, name, uid, lambda cur: {"phase": "Stopping", "reason": "", "message": "restarting"})
        self._patch(ns, name, uid, lambda cur: {"phase": "Provisioning", "reason": "", "message": "booting"})
        address = self._address(node, uid, vm)
        node.running[uid] = (ns, name)
        started = conditions.now()
        self._patch(ns, name, uid, lambda cur: {
            "phase": "Running", "reason": "", "message": "running", "vmm": node.vmms[0], "pid": 4242,
            "startedAt": started, "bootSeconds": 0.1, "ipAddress": address,
            "activeShape": {"vcpus": cur["spec"]["vcpus"], "memoryMiB": cur["spec"]["memoryMiB"]},
            "observedGeneration": cur["metadata"].get("generation"),
            **({"restartedAt": annotation} if annotation else {}),
            "conditions": self._ready(cur, True, "Booted")})

    def _placed(self, ns: str, name: str, uid: str) -> dict | None:
        """The MicroVM once it names a node (or is gone), else as it is after `PLACEMENT_WAIT`."""
        def seen() -> tuple | None:
            vm = self._get(ns, name)
            gone = vm is None or vm["metadata"]["uid"] != uid
            return (vm,) if gone or (vm.get("status") or {}).get("node") else None

        try:
            return wait_for(seen, PLACEMENT_WAIT, f"{ns}/{name} to be placed", interval=0.05)[0]
        except WaitTimeout:
            return self._get(ns, name)

    @staticmethod
    def _ready(vm: dict, ready: bool, reason: str) -> list[dict]:
        return conditions.set_condition((vm.get("status") or {}).get("conditions"), names.READY, ready, reason)[0]

    def _address(self, node: FakeNode, uid: str, vm: dict) -> str | None:
        if not vm["spec"].get("network"):
            return None
        if uid in node.addresses:
            return node.addresses[uid]
        obj = self.cluster.cluster_object(names.MICROVMNODES, node.name)
        block = ipaddress.IPv4Network(obj["spec"]["cidr"])
        used = set(node.addresses.values())
        hosts = list(block.hosts())[1:]  # the first host is the bridge's gateway
        address = next(str(h) for h in hosts if str(h) not in used)
        node.addresses[uid] = address
        return address

    # ------------------------------------------------------------------ lifecycle

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=f"fake-worker-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop everything and remove the MicroVMNodes (finalizers included)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sync_pool.shutdown(wait=True, cancel_futures=True)
        for name in self.nodes:
            try:
                self.cluster.patch_cluster_object(names.MICROVMNODES, name, {"metadata": {"finalizers": None}})
            except ApiException as exc:
                if exc.status != 404:
                    raise
            self.cluster.delete_cluster_object(names.MICROVMNODES, name)
        self._api.close()


def message_has_no_spec(raw: str) -> bool:
    """Whether a raw Celery message (JSON body) holds none of the MicroVM's spec fields."""
    text = json.dumps(raw) if not isinstance(raw, str) else raw
    return not any(f in text for f in ("vcpus", "memoryMiB", "image", "kernel", "initrd", "rootfs", "kernelArgs",
                                      "vmlinuz", "runStrategy", "nodeSelector"))
