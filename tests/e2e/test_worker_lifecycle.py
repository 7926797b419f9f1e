"""A MicroVM's life with every real part: API server, Redis, the operator, `mikrom worker` as root
(as the mikrom-worker ServiceAccount) and QEMU microvm guests under TCG.

The worker's bridge, taps, NAT rules and VMMs live in a network namespace the test creates; the
only traffic is a ping from that namespace to the guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from harness.http_files import FileServer
from harness.netns import link_exists, ping
from harness.procs import holds_for, wait_for
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names
from mikrom.worker import netdev

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")

CONSOLE_CAP = 16384
LOOPBACK = "127.0.0.1/32"
"""The tests' image server (harness.http_files) is on loopback, which a node refuses unless allowed."""


def _parse(ts: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def test_a_microvm_runs_answers_ping_stops_starts_restarts_and_is_deleted_without_a_trace(
        fleet, make_worker, netns, guest_image_dir):
    worker = make_worker(netns=netns, image_dir=guest_image_dir, console_max_bytes=CONSOLE_CAP)
    vms = fleet
    vms.node = worker.node

    # apply -> Running with an address, a pid, timings and Ready
    vms.create("web")
    st = vms.wait_phase("web", "Running", timeout=90, avoid=("Failed",))
    uid = vms.get("web")["metadata"]["uid"]
    assert st["node"] == worker.node and st["vmm"] == "qemu"
    assert st["ipAddress"] and st["macAddress"] == netdev.mac_for_uid(uid)
    assert st["pid"] in vmm_pids(worker.state_dir, uid) and len(vmm_pids(worker.state_dir, uid)) == 1
    assert 0.3 < st["bootSeconds"] < 60 and st["startedAt"]
    assert st["observedGeneration"] == vms.get("web")["metadata"]["generation"]
    assert st["activeShape"] == {"vcpus": 1, "memoryMiB": 128}
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    vms.wait_event("web", "Provisioning")
    vms.wait_event("web", "Started")

    # the host side of the tap reaches the guest
    tap = netdev.tap_name_for_uid(uid)
    assert link_exists(netns, tap)
    res = ping(netns, st["ipAddress"])
    assert res.returncode == 0, res.stdout + res.stderr

    # the console is kept, within its cap
    vm_dir = worker.vms_dir / uid
    console = (vm_dir / "console.log").read_text(errors="replace")
    assert "MIKROM-READY" in console or "MIKROM-READY" in (vm_dir / "console.log.1").read_text(errors="replace")
    kept = sum((vm_dir / n).stat().st_size for n in ("console.log", "console.log.1") if (vm_dir / n).exists())
    assert kept <= CONSOLE_CAP

    # Halted -> Stopped, no VMM process left
    first_ip, first_pid, first_started = st["ipAddress"], st["pid"], st["startedAt"]
    vms.patch("web", {"spec": {"runStrategy": "Halted"}})
    st = vms.wait_phase("web", "Stopped", timeout=60, avoid=("Failed",))
    assert "pid" not in st
    assert vmm_pids(worker.state_dir, uid) == []
    vms.wait_event("web", "Stopped")

    # Always again -> Running with the same address
    vms.patch("web", {"spec": {"runStrategy": "Always"}})
    st = vms.wait_phase("web", "Running", timeout=90, avoid=("Failed",))
    assert st["ipAddress"] == first_ip and st["pid"] != first_pid
    assert ping(netns, first_ip).returncode == 0

    # a new mikrom.io/restartedAt -> a new process, startedAt advanced, the value recorded
    before_pid, before_started = st["pid"], st["startedAt"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    vms.patch("web", {"metadata": {"annotations": {"mikrom.io/restartedAt": stamp}}})
    st = wait_for(lambda: (s := vms.status("web")).get("restartedAt") == stamp and s.get("phase") == "Running" and s,
                  90, "the restart to be recorded and the VM Running")
    assert st["pid"] != before_pid and _parse(st["startedAt"]) > _parse(before_started) > _parse(first_started)
    assert vmm_pids(worker.state_dir, uid) == [st["pid"]]

    # delete -> object gone, no process, no tap, no state directory
    vms.delete("web")
    vms.wait_gone("web", timeout=60)
    assert vmm_pids(worker.state_dir, uid) == []
    assert not link_exists(netns, tap)
    assert not vm_dir.exists()
    vms.wait_event("web", "CleanedUp")


def test_images_given_by_url_boot_and_are_downloaded_once_for_vms_created_together(
        fleet, make_worker, netns, guest_image_dir):
    # an empty image directory: only the URLs can boot it
    worker = make_worker(netns=netns, image_url_allowed_cidrs=LOOPBACK)
    fleet.node = worker.node
    server = FileServer(guest_image_dir)
    try:
        image = {what: {"url": server.url(name), "sha256": _sha256(guest_image_dir / name)}
                 for what, name in (("kernel", "vmlinuz"), ("initrd", "initrd.img"))}
        for name in ("fetched-a", "fetched-b"):
            fleet.create(name, network=False, image=image)
        for name in ("fetched-a", "fetched-b"):
            fleet.wait_phase(name, "Running", timeout=120, avoid=("Failed",))
        assert sorted(server.hits) == ["/initrd.img", "/vmlinuz"], "each image is downloaded once"
        cached = sorted(p for p in (worker.state_dir / "images").rglob("*") if p.is_file())
        assert [p.name for p in cached] == sorted(image[w]["sha256"] for w in image)
        assert all(p.stat().st_mode & 0o777 == 0o444 for p in cached)
    finally:
        server.close()


def test_a_start_whose_download_outlives_the_lease_it_was_decided_under_confirms_its_placement_and_runs(
        fleet, make_worker, netns, guest_image_dir):
    # the lease lasts 4 s and each image takes 3 s to come: the start's launch comes after the end
    # of the lease it was decided under, so it must confirm its placement again (not be refused
    # by its supervisor, which starts a VMM only under the lease its start was decided under)
    worker = make_worker(netns=netns, image_url_allowed_cidrs=LOOPBACK, heartbeat_seconds=1,
                         self_fence_after_seconds=4, fence_peer_window_seconds=1)
    fleet.node = worker.node
    with FileServer(guest_image_dir, delay=6.0) as server:
        image = {what: {"url": server.url(name), "sha256": _sha256(guest_image_dir / name)}
                 for what, name in (("kernel", "vmlinuz"), ("initrd", "initrd.img"))}
        # placed and settled first (Halted), so that the start is decided on an object nobody else
        # changes while its images come
        fleet.create("slow", network=False, image=image, runStrategy="Halted")
        fleet.wait_phase("slow", "Stopped", timeout=60, avoid=("Failed",))
        fleet.patch("slow", {"spec": {"runStrategy": "Always"}})
        st = fleet.wait_phase("slow", "Running", timeout=120, avoid=("Failed",))
    assert vmm_pids(worker.state_dir, fleet.uid("slow")) == [st["pid"]]
    reasons = [e.reason for e in fleet.events("slow")]
    assert "VMMStartFailed" not in reasons and "Failed" not in reasons, reasons


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_a_rootfs_with_the_wrong_sha256_fails_with_checksum_mismatch_leaves_nothing_and_is_not_fetched_again(
        fleet, make_worker, netns, guest_image_dir, tmp_path, celery_client):
    # the node syncs every 2 s: a retry, if there were one, would come within the quiet window below
    worker = make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=2,
                         image_url_allowed_cidrs=LOOPBACK)
    fleet.node = worker.node
    served = tmp_path / "served"
    served.mkdir()
    (served / "rootfs.img").write_bytes(os.urandom(1 << 20))
    actual = _sha256(served / "rootfs.img")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with FileServer(served) as server:
        fleet.create("corrupt", image={"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"},
                                       "rootfs": {"url": server.url("rootfs.img"), "sha256": wrong}})
        st = fleet.wait_phase("corrupt", "Failed", timeout=60, avoid=("Running",))
        assert st["reason"] == "ChecksumMismatch" and "spec.image.rootfs" in st["message"]
        assert actual not in st["message"], "the digest of the fetched bytes is not the tenant's to learn"
        ready = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "False" and ready["reason"] == "ChecksumMismatch"
        fleet.wait_event("corrupt", "ChecksumMismatch", type_="Warning")
        uid = fleet.uid("corrupt")
        cache = worker.state_dir / "images"
        assert not any(p.is_file() for p in cache.rglob("*")) if cache.exists() else True
        assert not (worker.vms_dir / uid).exists()
        assert vmm_pids(worker.state_dir) == []
        assert not link_exists(netns, netdev.tap_name_for_uid(uid))
        assert server.count("rootfs.img") == 1

        # not retried for this generation: neither by the node's periodic sync nor on a duplicate message
        ref = {"namespace": fleet.ns, "name": "corrupt", "uid": uid, "intent": "create"}
        again = celery_client.send_task(names.CREATE_VM, kwargs=ref, queue=names.node_queue(worker.node))
        assert again.get(timeout=30)["outcome"] == "nothing to do"
        holds_for(lambda: server.count("rootfs.img") == 1
                  and fleet.status("corrupt").get("reason") == "ChecksumMismatch", 6,
                  "a single download and the same failure")


@pytest.mark.parametrize("path", ["../vmlinuz", "/boot/vmlinuz", "images/../../etc/passwd"])
def test_an_image_path_with_dotdot_or_absolute_is_refused_by_the_api_server(fleet, path):
    from kubernetes.client import ApiException

    with pytest.raises(ApiException) as err:
        fleet.create("escape", image={"kernel": {"path": path}, "initrd": {"path": "initrd.img"}})
    assert err.value.status == 422 and "spec.image.kernel.path" in err.value.body


def test_an_image_path_leading_out_through_a_symlink_is_refused_before_anything_is_touched(
        fleet, make_worker, netns, own_image_dir, tmp_path):
    images = own_image_dir
    secret = tmp_path / "outside.img"
    secret.write_bytes(b"not for guests")
    (images / "rootfs.img").symlink_to(secret)
    worker = make_worker(netns=netns, image_dir=images)
    fleet.node = worker.node
    fleet.create("sneaky", image={"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"},
                                  "rootfs": {"path": "rootfs.img"}})
    st = fleet.wait_phase("sneaky", "Failed", timeout=60, avoid=("Running",))
    assert st["reason"] == "InvalidSpec" and "spec.image.rootfs.path" in st["message"]
    assert "outside the image directory" in st["message"]
    uid = fleet.get("sneaky")["metadata"]["uid"]
    assert not (worker.vms_dir / uid).exists()
    assert vmm_pids(worker.state_dir) == []
    assert not link_exists(netns, netdev.tap_name_for_uid(uid))
    assert secret.read_bytes() == b"not for guests"


def test_an_ext4_rootfs_is_the_vms_own_copy_and_keeps_its_writes_across_a_restart(
        fleet, make_worker, netns, own_image_dir, tmp_path):
    images = own_image_dir
    token = uuid.uuid4().hex
    content = tmp_path / "disk"
    content.mkdir()
    (content / "id").write_text(token + "\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "mikrom-test", "-d", str(content), str(images / "rootfs.ext4"),
                    "16M"], check=True, timeout=60, capture_output=True)
    original = _sha256(images / "rootfs.ext4")
    worker = make_worker(netns=netns, image_dir=images)
    fleet.node = worker.node
    fleet.create("disk", network=False, image={
        "kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}, "rootfs": {"path": "rootfs.ext4"},
        "kernelArgs": "console=ttyS0 reboot=k panic=1 mikrom.disk=1"})
    fleet.wait_phase("disk", "Running", timeout=120, avoid=("Failed",))
    uid = fleet.get("disk")["metadata"]["uid"]
    vm_dir = worker.vms_dir / uid
    assert f"MIKROM-DISK id={token} boots=1" in (vm_dir / "console.log").read_text(errors="replace")

    # stopped and started again: the same disk, with the first boot's write on it
    fleet.patch("disk", {"spec": {"runStrategy": "Halted"}})
    fleet.wait_phase("disk", "Stopped", timeout=60, avoid=("Failed",))
    fleet.patch("disk", {"spec": {"runStrategy": "Always"}})
    fleet.wait_phase("disk", "Running", timeout=120, avoid=("Failed",))
    assert f"MIKROM-DISK id={token} boots=2" in (vm_dir / "console.log").read_text(errors="replace")
    disks = [p for p in vm_dir.iterdir() if p.suffix in (".img", ".ext4")]
    assert len(disks) == 1, disks
    boots = subprocess.run(["debugfs", "-R", "cat /boots", str(disks[0])], capture_output=True, text=True,
                           timeout=30).stdout
    assert boots.split() == ["boot", "boot"]
    assert _sha256(images / "rootfs.ext4") == original, "the image itself is never written"

    fleet.delete("disk")
    fleet.wait_gone("disk", timeout=60)
    assert not vm_dir.exists()


def test_a_vm_whose_vmm_dies_is_restarted_under_always_and_one_that_powers_off_under_once_succeeds(
        fleet, make_worker, netns, guest_image_dir):
    from mikrom.worker.vmm.qemu import qmp_command

    worker = make_worker(netns=netns, image_dir=guest_image_dir, sync_interval_seconds=2)
    fleet.node = worker.node
    fleet.create("phoenix", network=False)
    fleet.create("mayfly", network=False, runStrategy="Once")
    first = fleet.wait_phase("phoenix", "Running", timeout=120, avoid=("Failed",))
    fleet.wait_phase("mayfly", "Running", timeout=120, avoid=("Failed",))
    once_uid = fleet.get("mayfly")["metadata"]["uid"]

    os.kill(first["pid"], 9)  # a crash
    qmp_command(worker.vms_dir / once_uid / "qmp.sock", "system_powerdown")  # the guest powers off
    st = fleet.wait_phase("mayfly", "Succeeded", timeout=60, avoid=("Failed",))
    assert st["finishedAt"] and "pid" not in st
    fleet.wait_event("mayfly", "Succeeded")

    st = wait_for(lambda: (s := fleet.status("phoenix")).get("phase") == "Running" and s.get("pid") != first["pid"]
                  and s, 60, "phoenix to run again in a new process")
    uid = fleet.get("phoenix")["metadata"]["uid"]
    assert vmm_pids(worker.state_dir, uid) == [st["pid"]]
    assert json.loads((worker.vms_dir / uid / "meta.json").read_text())["crashes"] == 1
    assert any(e.reason == "VMMExited" and e.type == "Warning" for e in fleet.events("phoenix"))
    # the Once VM stays finished (the node syncs every 2 s)
    holds_for(lambda: fleet.status("mayfly")["phase"] == "Succeeded" and vmm_pids(worker.state_dir, once_uid) == [],
              4, "the Once VM to stay finished")
