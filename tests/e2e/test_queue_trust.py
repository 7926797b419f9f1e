"""What a message on the queue can make a node do to a real, running VM, and what the VM's
process can learn of the broker: the real operator, `mikrom worker` as root, QEMU microvm under TCG.

- A forged message (a running VM's real uid with another name, or its name with another VM's uid)
  leaves the VMM running and its disk as it was.
- The VMM a worker starts does not inherit the worker's environment: MIKROM_BROKER_URL, with the
  broker's password, is not in /proc/<pid>/environ.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from harness.procs import holds_for
from harness.vms import e2e_skip_reason, vmm_pids

from mikrom import names

pytestmark = pytest.mark.skipif(e2e_skip_reason() is not None, reason=e2e_skip_reason() or "")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _disk(own_image_dir: Path, tmp_path: Path) -> None:
    content = tmp_path / "disk"
    content.mkdir()
    (content / "id").write_text("queue-trust\n")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "mikrom-test", "-d", str(content),
                    str(own_image_dir / "rootfs.ext4"), "16M"], check=True, timeout=60, capture_output=True)


def test_forged_messages_leave_a_running_vm_its_process_and_its_disk(fleet, make_worker, netns, own_image_dir,
                                                                     tmp_path, celery_client):
    _disk(own_image_dir, tmp_path)
    worker = make_worker(netns=netns, image_dir=own_image_dir)
    fleet.node = worker.node
    image = {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}, "rootfs": {"path": "rootfs.ext4"}}
    fleet.create("web", network=False, image=image)
    fleet.create("db", network=False)
    st = fleet.wait_phase("web", "Running", timeout=120, avoid=("Failed",))
    fleet.wait_phase("db", "Running", timeout=120, avoid=("Failed",))
    web, db = fleet.uid("web"), fleet.uid("db")
    vm_dir = worker.vms_dir / web
    disk = next(p for p in vm_dir.iterdir() if p.suffix in (".img", ".ext4"))
    before, inode = _sha256(disk), disk.stat().st_ino

    queue = names.node_queue(worker.node)
    forged = [(names.DELETE_VM, {"namespace": fleet.ns, "name": "not-web", "uid": web, "intent": "delete"}),
              (names.STOP_VM, {"namespace": fleet.ns, "name": "db", "uid": web, "intent": "stop"}),
              (names.RESTART_VM, {"namespace": fleet.ns, "name": "web", "uid": db, "intent": "restart"})]
    for task, kwargs in forged:
        out = celery_client.send_task(task, kwargs=kwargs, queue=queue).get(timeout=60)
        assert out["outcome"].startswith("dropped"), (task, out)
    for task, kwargs in forged:
        worker.wait_log(f"{task} for {kwargs['namespace']}/{kwargs['name']} (uid '{kwargs['uid']}') dropped", 10)

    assert vmm_pids(worker.state_dir, web) == [st["pid"]]
    holds_for(lambda: fleet.status("web").get("phase") == "Running" and fleet.status("web").get("pid") == st["pid"],
              2, "web to stay Running with the same VMM")
    assert len(vmm_pids(worker.state_dir, db)) == 1
    # the guest does not write to it (no mikrom.disk=1): the VM's own copy is byte for byte as it was
    assert disk.stat().st_ino == inode and _sha256(disk) == before


def test_a_vmm_started_by_a_worker_holding_the_broker_password_does_not_inherit_it(fleet, make_worker, netns,
                                                                                  guest_image_dir, redis):
    worker = make_worker(netns=netns, image_dir=guest_image_dir)
    assert redis.password in worker.env["MIKROM_BROKER_URL"]  # the worker itself has it
    fleet.node = worker.node
    fleet.create("quiet", network=False)
    st = fleet.wait_phase("quiet", "Running", timeout=120, avoid=("Failed",))
    pid = st["pid"]
    assert pid in vmm_pids(worker.state_dir, fleet.uid("quiet"))

    environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    assert not any(redis.password in entry for entry in environ), "the broker's password is in the VMM's environment"
    assert not any(entry.startswith(("MIKROM_BROKER_URL=", "MIKROM_RESULT_BACKEND=", "MIKROM_REDIS_PASSWORD=",
                                     "KUBECONFIG=")) for entry in environ), [e.split("=", 1)[0] for e in environ]
