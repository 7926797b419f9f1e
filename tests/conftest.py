"""Fixtures shared by every tier.

Session-scoped servers (a real kube-apiserver on kine, a real redis-server with a password) start
on first use and are stopped by PID at the end of the session. Each test that asks for
`namespace` gets a fresh one. Server logs live under `MIKROM_TEST_ARTIFACTS` (default
`.test-artifacts/` in the repository); they are deleted after a fully green session and kept, with
their tails attached to each failed test's report, otherwise.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness import controlplane, procs, redis_server

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("MIKROM_TEST_ARTIFACTS", REPO / ".test-artifacts"))

STARTED = procs.STARTED

# Fixtures of the tiers that run a real worker or boot VMs: the worker (make_worker, celery_client,
# worker_kubeconfig), network namespaces (netns, make_netns), the guest image (guest_image_dir,
# own_image_dir) and the e2e fleet (fleet, operator_env).
pytest_plugins = ["harness.netns", "harness.guest_image", "harness.worker_proc", "harness.fleet",
                  # a loopback TCP forwarder to cut one worker off the API server (forwarded_kubeconfig)
                  "harness.tcpproxy",
                  # the real one-node cluster (cluster, cluster_namespace) and its `cluster` marker
                  "harness.cluster_fixtures"]


def pytest_collection_modifyitems(config, items):
    for item in items:
        tier = Path(str(item.fspath)).relative_to(REPO / "tests").parts[0]
        if tier in ("unit", "integration", "e2e", "cluster"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def artifacts_dir(request) -> Path:
    # the second plus the pid: two sessions started in the same second must not share (or delete)
    # each other's logs and kubeconfigs
    d = ARTIFACTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    if request.session.testsfailed == 0 and not os.environ.get("MIKROM_KEEP_ARTIFACTS"):
        shutil.rmtree(d, ignore_errors=True)
    else:
        sys.stderr.write(f"\nserver logs kept in {d}\n")


@pytest.fixture(scope="session")
def control_plane(artifacts_dir):
    cp = controlplane.start(artifacts_dir / "controlplane")
    STARTED.extend(cp.processes)
    yield cp
    cp.stop()


@pytest.fixture(scope="session")
def redis(artifacts_dir):
    server = redis_server.start(artifacts_dir / "redis")
    STARTED.append(server.proc)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane):
    """A kubernetes ApiClient logged in as the admin user."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(control_plane.kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(control_plane, kube_api, request):
    """A fresh namespace per test (without kube-controller-manager a namespace never finishes
    deleting, so names never repeat)."""
    from kubernetes import client

    name = "t-" + uuid.uuid4().hex[:8]
    client.CoreV1Api(kube_api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        client.CoreV1Api(kube_api).delete_namespace(name, _request_timeout=10)
    except Exception:  # noqa: BLE001 - best effort; a fresh name per test keeps tests apart anyway
        pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when in ("call", "setup"):
        for p in STARTED:
            report.sections.append((f"{p.name} log (tail)", p.tail(60)))
