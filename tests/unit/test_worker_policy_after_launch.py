"""A start makes its VM's network policy entry while the VMM starts (the tap drops everything
until the entry exists): the launch and the entry at the same time, and a VM whose entry failed
is not left running behind a tap that passes nothing. The runtime and status writer are stand-ins
(this tier starts no VMM and runs no nft); the reconciler's own code runs as the worker runs it."""

from __future__ import annotations

import types

import pytest

from mikrom.worker import concurrently, netdev
from mikrom.worker import runtime as rt
from mikrom.worker.reconcile import Reconciler
from mikrom.worker.state import LocalVM

VM = {"metadata": {"name": "web", "namespace": "team-a", "uid": "u-1", "generation": 1},
      "spec": {"vcpus": 1, "memoryMiB": 128}, "status": {"node": "n1", "phase": "Provisioning"}}
ADDRESS = rt.Address(ip="10.0.0.2", prefix=26, gateway="10.0.0.1", mac="02:00:00:00:00:02", tap="mkt-u-1",
                     namespace="team-a", name="web")


class Runtime:
    def __init__(self, policy_error: Exception | None = None):
        self.calls: list[str] = []
        self.policy_error = policy_error

    def build_spec(self, local, vm, imgs, address):
        return types.SimpleNamespace(start_before=None)

    def launch(self, local, spec, vmm_name, strays_reaped=False, staged=None):
        self.calls.append("launch")
        return 4242

    def ensure_policy_entry(self, address):
        self.calls.append("policy")
        if self.policy_error is not None:
            raise self.policy_error

    def stop(self, local, timeout=None):
        self.calls.append(f"stop(timeout={timeout})")


class Writer:
    def __init__(self):
        self.events = []

    def record_events(self, deferred):
        self.events.append(list(deferred))


def reconciler(runtime) -> Reconciler:
    r = Reconciler(types.SimpleNamespace(runtime=runtime, writer=Writer(), node="n1"))
    r._await_ready = lambda vm, local, event_reason: "running"
    return r


def prepared(address=ADDRESS) -> concurrently.Outcomes:
    results = {"provisioning": VM, "images": rt.Images(kernel="/k", initrd=None, rootfs_source=None)}
    if address is not None:
        results["network"] = address
    return concurrently.Outcomes(results=results)


def launch(r: Reconciler, local: LocalVM, out) -> str:
    return r._launch_prepared(VM, local, out, configured=False, deferred=["Provisioning"], start_before=None,
                              staged=None, vmm_name="qemu", event_reason=None)


def test_the_policy_entry_is_made_beside_the_launch_and_the_vm_then_awaits_its_guest(tmp_path):
    runtime = Runtime()
    r = reconciler(runtime)
    assert launch(r, LocalVM(tmp_path, "u-1"), prepared()) == "running"
    assert sorted(runtime.calls) == ["launch", "policy"], "the entry is made beside the launch"
    assert r.writer.events == [["Provisioning"]]


def test_a_vm_without_a_network_makes_no_policy_entry(tmp_path):
    runtime = Runtime()
    assert launch(reconciler(runtime), LocalVM(tmp_path, "u-1"), prepared(address=None)) == "running"
    assert runtime.calls == ["launch"]


def test_a_failed_policy_entry_stops_the_vmm_on_purpose_and_hands_the_error_to_the_task(tmp_path):
    error = netdev.NetdevError("nft -f - failed (1): Could not process rule")
    runtime = Runtime(policy_error=error)
    r = reconciler(runtime)
    local = LocalVM(tmp_path, "u-1")
    with pytest.raises(netdev.NetdevError) as raised:
        launch(r, local, prepared())
    assert raised.value is error, "the task's retry decides what follows, as for a network step's error"
    assert sorted(runtime.calls[:2]) == ["launch", "policy"]
    assert runtime.calls[2:] == ["stop(timeout=0)"], "not left running behind a tap that passes nothing"
    assert local.read_meta()["desiredStop"] is True, "a stop of the node's own, not a crash"
    assert r.writer.events == [["Provisioning"]]
