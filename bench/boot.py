#!/usr/bin/env python3
"""Boot benchmark: what Mikrom adds on top of the VMM's own boot, measured in one run.

It starts what the e2e tests start (tests/harness): a real kube-apiserver on kine, a real Redis,
`mikrom operator` and `mikrom worker` (as root, as their ServiceAccounts), a network namespace for
the bridge and taps, and the test guest image (hack/test-image.sh). Then, with the same image, the
same shape (1 vCPU, 128 MiB), the same network setup and the same QEMU driver:

  raw        the driver alone: tap ready, `driver.start()` to the guest's ready marker;
  mikrom     `create MicroVM` accepted by the API server to `status.phase == Running`;

first for N sequential VMs (each stopped or deleted before the next), then at concurrency 2 (two
VMs in flight at any time) as boots per second. Must run as root.

    sudo .venv/bin/python bench/boot.py [--count 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import controlplane, operator_proc, redis_server, worker_proc  # noqa: E402
from kubernetes import config  # noqa: E402

from mikrom.worker import netdev, vmm  # noqa: E402

LEFT_OUT = """\
What this leaves out:
  - KVM: /dev/kvm here cannot boot stock kernels, so every boot is QEMU microvm under TCG (software
    emulation, ~2 s, CPU-bound); with KVM the VMM boot shrinks to well under a second and Mikrom's
    fixed overhead becomes the larger share;
  - Firecracker (needs KVM), rootfs images (the test guest is kernel + initramfs, so no per-VM disk
    copy) and image downloads (the image is a local `path`; a `url` is fetched once per digest);
  - placement among many nodes, and a loaded API server: one node, one kube-apiserver on kine/SQLite
    and one Redis on loopback, sharing this machine's CPUs with the guests;
  - the raw figure starts the clock at `driver.start()` with the tap already up; Mikrom's includes
    the operator's placement and dispatch, the queue, the API reads and status writes, address
    allocation and the tap;
  - the status is polled every 20 ms, which adds up to 20 ms to each Mikrom figure;
  - in the concurrency-2 series each slot also removes its VM before the next (Mikrom: delete through
    the operator and the worker until the object is gone; raw: the driver's stop), so the rate is
    of full create-boot-remove cycles, and it moves with whatever else runs on the machine."""


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"median {statistics.median(xs):6.2f} s   min {xs[0]:6.2f} s   max {xs[-1]:6.2f} s   "
            f"(n={len(xs)})")


class RawBoots:
    """The QEMU driver alone, on a tap in the same kind of namespace and bridge."""

    def __init__(self, image: Path, netns: str, workdir: Path):
        self.image, self.netns, self.workdir = image, netns, workdir
        self.driver = vmm.get_driver("qemu")
        netdev.ensure_bridge("mkbench0", "10.254.0.1/24", netns=netns)

    def boot(self, i: int) -> float:
        uid = f"raw-{uuid.uuid4()}"
        tap = netdev.tap_name_for_uid(uid)
        netdev.ensure_tap(tap, "mkbench0", netns=self.netns)
        spec = vmm.VMSpec(uid=uid, name=f"raw-{i}", vcpus=1, memory_mib=128, kernel=str(self.image / "vmlinuz"),
                          initrd=str(self.image / "initrd.img"), tap=tap, mac=netdev.mac_for_uid(uid),
                          kernel_args="console=ttyS0 reboot=k panic=1 "
                                      + netdev.kernel_ip_arg(f"10.254.0.{10 + i % 200}", "10.254.0.1", 24),
                          state_dir=self.workdir / uid[:12], netns=self.netns)
        t0 = time.monotonic()
        self.driver.start(spec)
        self.driver.wait_ready(spec, timeout=120)
        took = time.monotonic() - t0
        self.driver.stop(spec.state_dir, timeout=10)
        netdev.delete_tap(tap, self.netns)
        return took


class MikromBoots:
    def __init__(self, vms: worker_proc.VMs):
        self.vms = vms
        self.breakdown: list[dict] = []

    def boot(self, i: int, prefix: str = "seq") -> float:
        name = f"{prefix}-{i}"
        t0 = time.monotonic()
        wall0 = time.time()
        self.vms.create(name)
        while True:
            st = self.vms.status(name)
            if st.get("phase") == "Running":
                took = time.monotonic() - t0
                break
            if st.get("phase") == "Failed" or time.monotonic() - t0 > 180:
                raise RuntimeError(f"{name} did not run: {st}")
            time.sleep(0.02)
        started = _ts(st.get("startedAt"))
        sent = _ts((st.get("dispatch") or {}).get("sentAt"))
        self.breakdown.append({"dispatch": sent - wall0 if sent else None,
                               "to_vmm_start": started - wall0 if started else None,
                               "boot": st.get("bootSeconds"), "total": took})
        self.vms.delete(name)
        self.vms.wait_gone(name, timeout=60)
        return took


def _ts(value: str | None) -> float | None:
    if not value:
        return None
    import datetime as dt

    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def at_concurrency(boot, count: int, parallel: int = 2) -> float:
    """Boots per second with `parallel` boots in flight until `count` are done."""
    todo = list(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop():
        while True:
            with lock:
                if not todo or errors:
                    return
                i = todo.pop(0)
            try:
                boot(i)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    t0 = time.monotonic()
    threads = [threading.Thread(target=loop) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return count / (time.monotonic() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="VMs per series (default 10)")
    args = parser.parse_args()
    reason = worker_proc.e2e_skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="mkb-", dir="/tmp"))
    cp = rd = op = worker = None
    netns = worker_proc.netns_create()
    try:
        image = worker_proc.guest_image()
        cp = controlplane.start(work / "controlplane")
        rd = redis_server.start(work / "redis")
        worker_proc.install_crds(cp)
        operator_proc.install(cp)
        wk_cfg = worker_proc.service_account_kubeconfig(cp, work / "worker.kubeconfig")
        op_cfg = operator_proc.service_account_kubeconfig(cp, work / "operator.kubeconfig")
        api = config.new_client_from_config(config_file=str(cp.kubeconfig))
        cp.kubectl("create", "namespace", "bench")
        worker_proc.create_pool(api, "bench", "10.250.0.0/20", 26)
        broker = rd.url(db=worker_proc.BROKER_DB)
        op = operator_proc.start(cp, broker, work / "logs", "operator", op_cfg, namespace="bench", standalone=True,
                                 env={"MIKROM_NODE_LOST_AFTER_SECONDS": "40"})
        op.wait_live()
        node = "bench-node"
        env = worker_proc.worker_env(kubeconfig=wk_cfg, broker_url=broker, node=node, state_dir=work / "s",
                                     image_dir=image, netns=netns, capacity_vcpus=8)
        worker = worker_proc.WorkerProc(node=node, env=env, logdir=work / "logs", state_dir=work / "s").start()
        vms = worker_proc.VMs(api, "bench", pool="bench")
        vms.node = node
        raw = RawBoots(image, netns, work / "raw" / "vms")  # where vmm_pids looks
        mikrom = MikromBoots(vms)

        print("warming up (one boot each) ...", flush=True)
        raw.boot(999)
        mikrom.boot(999, prefix="warm")
        mikrom.breakdown.clear()

        raw_seq, mk_seq = [], []
        for i in range(args.count):  # interleaved, so both see the same machine load
            raw_seq.append(raw.boot(i))
            mk_seq.append(mikrom.boot(i))
            print(f"  {i + 1:2d}/{args.count}  raw {raw_seq[-1]:5.2f} s   mikrom {mk_seq[-1]:5.2f} s", flush=True)
        raw_rate = at_concurrency(raw.boot, args.count)
        mk_rate = at_concurrency(lambda i: mikrom.boot(i, prefix="par"), args.count)

        seq_bd = mikrom.breakdown[:args.count]
        print()
        print(f"{args.count} sequential boots, 1 vCPU / 128 MiB, QEMU microvm (TCG), kernel + initramfs, one tap each")
        print(f"  raw VMM boot (start -> ready marker):          {_stats(raw_seq)}")
        print(f"  Mikrom (create accepted -> status Running):    {_stats(mk_seq)}")
        print(f"  ratio of medians Mikrom / raw:                 {statistics.median(mk_seq) / statistics.median(raw_seq):.2f}")
        print(f"  overhead of medians Mikrom - raw:              {statistics.median(mk_seq) - statistics.median(raw_seq):.2f} s")
        parts = [("create -> operator dispatched", "dispatch"), ("create -> VMM started", "to_vmm_start"),
                 ("VMM start -> ready (status.bootSeconds)", "boot")]
        for label, key in parts:
            xs = [b[key] for b in seq_bd if b[key] is not None]
            if xs:
                print(f"    {label:42s} median {statistics.median(xs):5.2f} s")
        print(f"boots per second at concurrency 2 ({args.count} VMs):")
        print(f"  raw VMM:  {raw_rate:.2f} boots/s")
        print(f"  Mikrom:   {mk_rate:.2f} boots/s   ({mk_rate / raw_rate:.2f} of raw)")
        print()
        print(LEFT_OUT)
        return 0
    finally:
        for p in (worker, op):
            if p is not None:
                try:
                    (p.cleanup if isinstance(p, worker_proc.WorkerProc) else p.stop)()
                except Exception:  # noqa: BLE001
                    pass
        for pid in worker_proc.vmm_pids(work / "s") + worker_proc.vmm_pids(work / "raw"):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if rd is not None:
            rd.stop()
        if cp is not None:
            cp.stop()
        worker_proc.netns_delete(netns)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
