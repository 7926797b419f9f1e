"""pytest fixtures for the `cluster` tier: a real one-node cluster (see cluster.py), once per session.

`cluster` starts it on first use (root only: network namespaces, containerd, kubelet) with its
state in a fresh directory under /tmp and its logs under the session's artifacts. The tests that
use it are marked `cluster` and run first, together; the cluster stops right after the last of
them, so it takes no CPU from the VM boots of the other tiers. With `MIKROM_TEST_CLUSTER=STATE_DIR`
the tests use the cluster that `make cluster` (hack/cluster.py up) started there instead, and
leave it running.

`cluster_namespace` is a fresh namespace per test (kube-controller-manager runs, so it is deleted
for real afterwards).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import pytest

from . import procs
from .cluster import Cluster, up
from .waits import wait_for

START_TIMEOUT = 3600
"""The first cluster test's setup may build the images (hack/images.sh, minutes on a cold cache)."""

_LAST_USER = pytest.StashKey()
_RUNNING: list[Cluster] = []
"""The cluster this session started, until it is stopped."""


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the real one-node cluster (kubelet, containerd; root)")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(START_TIMEOUT))


def pytest_collection_finish(session):
    # the selected items, after -k/-m: the cluster's users first, together
    users = [item for item in session.items if item.get_closest_marker("cluster")]
    if users:
        chosen = set(users)
        session.items[:] = users + [item for item in session.items if item not in chosen]
        session.config.stash[_LAST_USER] = users[-1]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if item.config.stash.get(_LAST_USER, None) is item:
        _stop()


def _stop() -> None:
    while _RUNNING:
        c = _RUNNING.pop()
        for p in c.processes:
            if p in procs.STARTED:
                procs.STARTED.remove(p)
        c.stop()


@pytest.fixture(scope="session")
def cluster(artifacts_dir) -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the cluster tier needs root: network namespaces, containerd, kubelet")
    reuse = os.environ.get("MIKROM_TEST_CLUSTER")
    if reuse:
        yield Cluster.load(Path(reuse))
        return
    state = Path(tempfile.mkdtemp(prefix="mikrom-cluster-"))
    c = up(state, logs=artifacts_dir / "cluster")
    _RUNNING.append(c)
    procs.STARTED.extend(c.processes)
    try:
        yield c
    finally:
        _stop()


@pytest.fixture
def cluster_namespace(cluster) -> str:
    name = "ct-" + uuid.uuid4().hex[:8]
    cluster.kubectl("create", "namespace", name)
    # pods cannot be created before kube-controller-manager gave the namespace its ServiceAccount
    wait_for(lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
             30, f"the default ServiceAccount in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
