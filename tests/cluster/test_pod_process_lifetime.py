"""What outlives a pod: a process started detached inside a privileged `hostPID` pod dies with the
pod (the shim kills everything in the container's cgroup), and survives it once moved into a
cgroup under the *host's* cgroup root (a hostPath mount of /sys/fs/cgroup, its pid written into
`cgroup.procs` of a new group in every v1 hierarchy and the unified one). The worker's VMMs
depend on the second; the first is why they must."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from harness import cluster_pods
from harness.cluster_host import cgroup_hierarchies
from harness.waits import holds_for, wait_for

# prints the pid of a `sleep` that left the exec session and its process group (hostPID: a host pid)
DETACH = 'setsid sleep "$1" </dev/null >/dev/null 2>&1 & echo $!'

# moves pid $1 into group $2 of every hierarchy under /host/cgroup (the host's /sys/fs/cgroup)
MOVE = """
set -eu
for h in /host/cgroup/*/; do
  g="$h$2"
  mkdir -p "$g"
  if [ -f "${h}cpuset.cpus" ]; then
    cat "${h}cpuset.cpus" >"$g/cpuset.cpus"
    cat "${h}cpuset.mems" >"$g/cpuset.mems"
  fi
  echo "$1" >"$g/cgroup.procs"
done
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


@pytest.fixture
def host_pid_pod(cluster, cluster_namespace):
    """A privileged hostPID pod of the worker image with the host's /sys/fs/cgroup at /host/cgroup."""
    spec = cluster_pods.sleeper(
        "holder", cluster.images["worker"]["ref"], hostPID=True,
        container={"securityContext": {"privileged": True},
                   "volumeMounts": [{"name": "cgroup", "mountPath": "/host/cgroup"}]},
        volumes=[{"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}}])
    cluster_pods.apply(cluster, cluster_namespace, [spec])
    cluster_pods.wait_ready(cluster, cluster_namespace, "holder")
    return cluster_namespace


@pytest.fixture
def host_group():
    """A cgroup name under the host's root; the groups and any process left in them are removed after."""
    name = "mikrom-test-" + uuid.uuid4().hex[:8]
    yield name
    for h in cgroup_hierarchies():
        group = h / name
        if group.is_dir():
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_for(lambda: not (group / "cgroup.procs").read_text().split(), 10, f"{group} to empty")
            group.rmdir()


def start_detached(cluster, ns: str, seconds: int) -> int:
    pid = int(cluster_pods.exec_in(cluster, ns, "holder", "sh", "-c", DETACH, "sh", str(seconds)).stdout.strip())
    wait_for(lambda: alive(pid) and cmdline(pid) == ["sleep", str(seconds)], 10, f"the detached sleep (pid {pid})")
    # it left the exec session but not the container: its cgroup is the pod's
    assert f"{cluster.layout.cgroup_root}/kubepods" in Path(f"/proc/{pid}/cgroup").read_text()
    return pid


def delete_pod(cluster, ns: str) -> None:
    cluster.kubectl("delete", "pod", "holder", "-n", ns, "--wait=true", "--timeout=60s", timeout=90)


def test_a_detached_process_in_a_host_pid_pod_dies_with_the_pod(cluster, host_pid_pod):
    pid = start_detached(cluster, host_pid_pod, 3601)
    delete_pod(cluster, host_pid_pod)
    wait_for(lambda: not alive(pid), 30, f"the detached process {pid} to die with its pod")


def test_a_detached_process_moved_into_a_host_cgroup_outlives_its_pod(cluster, host_pid_pod, host_group):
    pid = start_detached(cluster, host_pid_pod, 3602)
    cluster_pods.exec_in(cluster, host_pid_pod, "holder", "sh", "-c", MOVE, "sh", str(pid), host_group)
    groups = {h: h / host_group for h in cgroup_hierarchies()}
    for h, group in groups.items():
        assert str(pid) in (group / "cgroup.procs").read_text().split(), f"pid {pid} is not in {group}"
    delete_pod(cluster, host_pid_pod)
    holds_for(lambda: alive(pid), 3, f"the moved process {pid} alive after its pod is gone")
    assert cmdline(pid) == ["sleep", "3602"]
