"""The pure side of worker/hostcgroup.py: where a VM's host cgroup is, which limits it gets in
cgroup v1 and v2, how hierarchies are found under a root, and what the Firecracker jailer is told.
The real groups (mkdir, limits, a VMM's /proc/<pid>/cgroup) are checked in
tests/e2e/test_vmm_host_cgroup.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mikrom.settings import Settings
from mikrom.worker import hostcgroup, vmm
from mikrom.worker.hostcgroup import HostCgroupConfig, Hierarchy
from mikrom.worker.locks import NodeLocks
from mikrom.worker.runtime import Runtime
from mikrom.worker.vmm import FirecrackerDriver, JailerConfig, QemuDriver, VMSpec

UID = "5f0c2d7e-1b2a-4c3d-9e8f-a0b1c2d3e4f5"


def test_a_vms_group_is_parent_then_uid_inside_each_hierarchy():
    assert hostcgroup.group_dir("/sys/fs/cgroup/memory", "mikrom", UID) == Path(f"/sys/fs/cgroup/memory/mikrom/{UID}")
    assert hostcgroup.group_dir("/sys/fs/cgroup", "kube/mikrom", UID) == Path(f"/sys/fs/cgroup/kube/mikrom/{UID}")


@pytest.mark.parametrize("parent", ["", "/mikrom", "mikrom/..", "../etc", "a//b", "mi krom", "a/./b", "x" * 65])
def test_a_parent_that_could_leave_the_hierarchy_is_refused(parent):
    with pytest.raises(ValueError, match="host cgroup parent"):
        HostCgroupConfig(parent=parent)


@pytest.mark.parametrize("uid", ["", "..", "a/b", "a b", "x" * 65])
def test_a_uid_that_is_not_a_plain_name_cannot_name_a_group(uid):
    with pytest.raises(ValueError, match="cannot name a cgroup"):
        hostcgroup.group_dir("/sys/fs/cgroup/cpu", "mikrom", uid)


def test_v1_limits_are_a_cfs_quota_of_the_vcpus_and_memory_plus_overhead_period_first():
    got = hostcgroup.limits(1, vcpus=2, memory_mib=512, overhead_mib=256)
    assert got == {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "200000",
                   "memory.limit_in_bytes": str((512 + 256) * 1024 * 1024)}
    assert list(got) == ["cpu.cfs_period_us", "cpu.cfs_quota_us", "memory.limit_in_bytes"]


def test_v2_limits_are_cpu_max_and_memory_max():
    assert hostcgroup.limits(2, vcpus=3, memory_mib=128, overhead_mib=64) == {
        "cpu.max": "300000 100000", "memory.max": str(192 << 20)}


def test_limits_refuse_an_empty_shape_and_an_unknown_version():
    with pytest.raises(ValueError):
        hostcgroup.limits(1, vcpus=0, memory_mib=128, overhead_mib=0)
    with pytest.raises(ValueError):
        hostcgroup.limits(3, vcpus=1, memory_mib=128, overhead_mib=0)


def test_v1_controllers_come_from_the_mount_directory_name():
    assert hostcgroup.v1_controllers("cpu,cpuacct") == {"cpu", "cpuacct"}
    assert hostcgroup.v1_controllers("systemd") == {"systemd"}


def test_only_cpu_and_memory_are_enabled_for_children_and_only_where_offered():
    assert hostcgroup.needed_v2_controllers(frozenset({"cpuset", "cpu", "io", "memory", "pids"})) == ["cpu", "memory"]
    assert hostcgroup.needed_v2_controllers(frozenset({"hugetlb"})) == []  # a hybrid host's v2


def test_proc_cgroup_is_read_per_hierarchy_with_v2_under_the_empty_key():
    text = "9:name=systemd:/\n4:memory:/mikrom/abc\n1:cpu,cpuacct:/mikrom/abc\n0::/mikrom/abc\n"
    assert hostcgroup.parse_proc_cgroup(text) == {
        "name=systemd": "/", "memory": "/mikrom/abc", "cpu,cpuacct": "/mikrom/abc", "": "/mikrom/abc"}


def test_the_jailer_gets_the_same_limits_as_cgroup_flags():
    assert hostcgroup.jailer_cgroup_args(1, 1, 128, 64) == [
        "--cgroup", "cpu.cfs_period_us=100000", "--cgroup", "cpu.cfs_quota_us=100000",
        "--cgroup", f"memory.limit_in_bytes={192 << 20}"]


def _fake_hybrid_root(root: Path) -> Path:
    """The directory shape of this machine's cgroup mount (v1 hierarchies plus v2 at `unified`)."""
    for name in ("cpu,cpuacct", "memory", "freezer", "pids", "systemd"):
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.procs").write_text("")
    (root / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    (root / "not-a-hierarchy").mkdir()
    return root


def test_a_hybrid_root_lists_each_v1_hierarchy_once_and_the_v2_one(tmp_path):
    root = _fake_hybrid_root(tmp_path / "cgroup")
    found = {h.path.name: h for h in hostcgroup.hierarchies(root)}
    assert sorted(found) == ["cpu,cpuacct", "freezer", "memory", "pids", "systemd", "unified"]
    assert found["cpu,cpuacct"] == Hierarchy(root / "cpu,cpuacct", 1, frozenset({"cpu", "cpuacct"}))
    assert found["unified"].version == 2 and found["unified"].controllers == {"hugetlb"}
    assert hostcgroup.host_version(root) == 1


def test_a_pure_v2_root_is_one_hierarchy(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.procs").write_text("")
    (tmp_path / "system.slice").mkdir()
    assert hostcgroup.hierarchies(tmp_path) == [
        Hierarchy(tmp_path, 2, frozenset({"cpuset", "cpu", "io", "memory", "pids"}))]
    assert hostcgroup.host_version(tmp_path) == 2


def test_a_root_without_hierarchies_is_an_error_naming_it(tmp_path):
    with pytest.raises(hostcgroup.HostCgroupError, match=str(tmp_path)):
        hostcgroup.hierarchies(tmp_path)
    with pytest.raises(hostcgroup.HostCgroupError, match="cannot list"):
        hostcgroup.hierarchies(tmp_path / "missing")


def test_the_config_is_saved_with_the_driver_and_read_back(tmp_path):
    cfg = {"root": str(tmp_path), "parent": "mikrom", "memory_overhead_mib": 128, "namespace": "/proc/1/ns/cgroup"}
    driver = QemuDriver(host_cgroup=cfg)
    saved = json.loads(json.dumps(driver.config()))
    assert saved["host_cgroup"] == cfg
    assert vmm.get_driver("qemu", **saved).host_cgroup == HostCgroupConfig(**cfg)
    assert QemuDriver().config()["host_cgroup"] is None


def test_the_worker_settings_give_every_driver_the_host_cgroup_unless_switched_off(tmp_path):
    on = Runtime(Settings(state_dir=str(tmp_path), host_cgroup_root="/host/cgroup", host_cgroup_parent="mk",
                          host_cgroup_memory_overhead_mib=99), NodeLocks(tmp_path / "locks"))
    for name in ("qemu", "firecracker"):
        assert on.driver_configs()[name]["host_cgroup"] == {
            "root": "/host/cgroup", "parent": "mk", "memory_overhead_mib": 99}
    off = Runtime(Settings.from_env({"MIKROM_STATE_DIR": str(tmp_path), "MIKROM_HOST_CGROUPS": "false"}),
                  NodeLocks(tmp_path / "locks"))
    assert off.driver_configs()["qemu"]["host_cgroup"] is None
    assert off.driver_configs()["firecracker"]["host_cgroup"] is None


def _spec(tmp_path: Path) -> VMSpec:
    return VMSpec(uid=UID, name="fc", vcpus=2, memory_mib=128, kernel=str(tmp_path / "vmlinux"),
                  state_dir=tmp_path / "vms" / UID)


def test_a_jailed_firecracker_is_placed_in_the_vms_host_group_with_the_hosts_version(tmp_path):
    root = _fake_hybrid_root(tmp_path / "cgroup")
    driver = FirecrackerDriver(jailer=JailerConfig(chroot_base=str(tmp_path / "jail")),
                               host_cgroup={"root": str(root), "parent": "mikrom", "memory_overhead_mib": 64})
    argv = driver.command(_spec(tmp_path))
    assert argv[argv.index("--cgroup-version") + 1] == "1"
    assert argv[argv.index("--parent-cgroup") + 1] == "mikrom"
    flags = [argv[i + 1] for i, a in enumerate(argv) if a == "--cgroup"]
    assert flags == ["cpu.cfs_period_us=100000", "cpu.cfs_quota_us=200000", f"memory.limit_in_bytes={192 << 20}"]

    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cgroup.controllers").write_text("cpu memory\n")
    driver = FirecrackerDriver(jailer=JailerConfig(chroot_base=str(tmp_path / "jail")),
                               host_cgroup={"root": str(tmp_path / "v2"), "parent": "mikrom"})
    argv = driver.command(_spec(tmp_path))
    assert argv[argv.index("--cgroup-version") + 1] == "2"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--cgroup"] == [
        "cpu.max=200000 100000", f"memory.max={(128 + 256) << 20}"]


def test_the_launch_takes_the_group_its_preparation_made_unless_the_shape_changed_or_it_was_removed(
        tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    for name in ("cpu,cpuacct", "memory", "pids"):  # v1 hierarchies
        (root / name).mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    cfg = HostCgroupConfig(root=str(root), parent="mikrom", memory_overhead_mib=64)
    placement = hostcgroup.create(cfg, UID, 1, 128)
    assert len(placement.procs) == 3
    for procs in placement.procs:
        procs.write_text("")  # what the kernel puts in every new group
    walks = []
    real = hostcgroup._create
    monkeypatch.setattr(hostcgroup, "_create", lambda *a: walks.append(a) or real(*a))

    args = hostcgroup.supervisor_args(cfg, UID, 1, 128)
    assert [args[i + 1] for i, a in enumerate(args) if a == "--cgroup-procs"] == [str(p) for p in placement.procs]
    assert walks == []  # no second walk of every hierarchy

    hostcgroup.supervisor_args(cfg, UID, 2, 128)  # another shape: its limits are written
    assert len(walks) == 1
    hostcgroup.supervisor_args(cfg, UID, 2, 128)
    assert len(walks) == 1

    hostcgroup.remove(cfg, UID, timeout=0)  # forgotten with its removal, whether or not it went
    hostcgroup.supervisor_args(cfg, UID, 2, 128)
    assert len(walks) == 2

    placement.procs[0].unlink()  # a group gone behind this process's back is made again
    hostcgroup.supervisor_args(cfg, UID, 2, 128)
    assert len(walks) == 3
