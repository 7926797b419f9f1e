"""Node loss seen from both sides: the worker loses the API server (a proxy between them is cut),
fences itself by stopping its VMs, the operator marks them Unknown; when the connection returns the
worker heartbeats again, restarts what is still assigned to it and reports the truth. A VM not
pinned to the node is placed on another once the node has been lost past its self-fence time, and
the returning node lets go of what it held."""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import yaml
from harness.procs import holds_for, wait_for
from harness.netns import ping
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


FENCE_AFTER = 5  # the workers' selfFenceAfterSeconds, and the operator's idea of it


@pytest.fixture
def operator_env():
    return {"MIKROM_NODE_LOST_AFTER_SECONDS": "6", "MIKROM_SELF_FENCE_AFTER_SECONDS": str(FENCE_AFTER),
            "MIKROM_RESCHEDULE_MARGIN_SECONDS": "3"}


class CuttableProxy:
    """A TCP proxy on loopback whose connections can be cut and refused, then allowed again."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.pairs.append((conn, upstream))
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket):
        try:
            while self.open.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            a.close()
            b.close()

    def cut(self):
        self.open.clear()
        with self.lock:
            for a, b in self.pairs:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self.pairs.clear()

    def restore(self):
        self.open.set()

    def close(self):
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxied_kubeconfig(worker_kubeconfig, tmp_path):
    cfg = yaml.safe_load(worker_kubeconfig.read_text())
    server = urlsplit(cfg["clusters"][0]["cluster"]["server"])
    proxy = CuttableProxy((server.hostname, server.port))
    cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path = tmp_path / "proxied.kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    yield path, proxy
    proxy.close()


def test_a_worker_cut_off_from_the_api_server_fences_its_vms_and_restores_them_when_it_returns(
        proxied_kubeconfig, fleet, make_worker, netns, guest_image_dir):
    # the proxy comes first so it is torn down last: the worker confirms the final deletions
    kubeconfig, proxy = proxied_kubeconfig
    worker = make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=1,
                         self_fence_after_seconds=FENCE_AFTER, sync_interval_seconds=3)
    worker.env["KUBECONFIG"] = str(kubeconfig)
    worker.start()
    fleet.node = worker.node
    fleet.create("island")
    st = fleet.wait_phase("island", "Running", timeout=90, avoid=("Failed",))
    uid = fleet.get("island")["metadata"]["uid"]
    first_pid, ip = st["pid"], st["ipAddress"]

    proxy.cut()
    t0 = time.monotonic()
    worker.wait_log("self-fencing", 30)
    wait_for(lambda: vmm_pids(worker.state_dir, uid) == [], 20, "the fenced worker to stop its VM")
    # the last good heartbeat was at most heartbeat_seconds (1) before the cut
    assert time.monotonic() - t0 >= 5 - 1 - 0.2, "fenced before selfFenceAfterSeconds"
    st = fleet.wait_phase("island", "Unknown", timeout=30)  # the operator's view of the lost node
    assert any(c["type"] == "NodeReachable" and c["status"] == "False" for c in st["conditions"])

    proxy.restore()
    st = wait_for(lambda: (s := fleet.status("island")).get("phase") == "Running" and s.get("pid") != first_pid
                  and s, 90, "island to run again in a new process")
    assert st["ipAddress"] == ip
    assert vmm_pids(worker.state_dir, uid) == [st["pid"]]
    assert ping(netns, ip).returncode == 0


def test_a_vm_of_a_node_lost_past_its_fence_time_moves_to_another_node_and_the_old_node_lets_go(
        proxied_kubeconfig, fleet, make_worker, netns, guest_image_dir):
    kubeconfig, proxy = proxied_kubeconfig
    sel = {"e2e-move": uuid.uuid4().hex[:10]}
    lost = make_worker(netns=netns, image_dir=guest_image_dir, start=False, heartbeat_seconds=1,
                       self_fence_after_seconds=FENCE_AFTER, sync_interval_seconds=3)
    lost.env["KUBECONFIG"] = str(kubeconfig)
    lost.start()
    fleet.patch_cluster_object(names.MICROVMNODES, lost.node, {"metadata": {"labels": sel}})
    fleet.create("nomad", network=False, nodeSelector=sel)  # not pinned: it may move
    st = fleet.wait_phase("nomad", "Running", timeout=90, avoid=("Failed",))
    uid = fleet.get("nomad")["metadata"]["uid"]
    assert st["node"] == lost.node
    spare = make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=3)
    fleet.patch_cluster_object(names.MICROVMNODES, spare.node, {"metadata": {"labels": sel}})

    proxy.cut()
    t0 = time.monotonic()
    lost.wait_log("self-fencing", 30)
    wait_for(lambda: vmm_pids(lost.state_dir, uid) == [], 20, "the fenced node to stop its VM")
    st = wait_for(lambda: (s := fleet.status("nomad")).get("node") == spare.node and s.get("phase") == "Running"
                  and s, 90, "nomad to run on the spare node")
    assert time.monotonic() - t0 >= FENCE_AFTER + 3 - 1 - 1, "moved before the fence time plus the margin"
    assert vmm_pids(spare.state_dir, uid) == [st["pid"]]
    event = fleet.wait_event("nomad", "Rescheduling", type_="Warning")
    assert lost.node in event.message

    # the lost node returns: it lets go of its copy and never reports over the spare node's status
    proxy.restore()
    wait_for(lambda: not (lost.vms_dir / uid).exists(), 60, "the returning node to remove its copy")
    assert vmm_pids(lost.state_dir, uid) == []
    def still_on_the_spare() -> bool:
        now = fleet.status("nomad")
        return ((now.get("node"), now.get("phase"), now.get("pid")) == (spare.node, "Running", st["pid"])
                and vmm_pids(spare.state_dir, uid) == [st["pid"]])

    # through more sync rounds of the returning node (every 3 s)
    holds_for(still_on_the_spare, 4, "nomad to stay on the spare node, in the same process")
