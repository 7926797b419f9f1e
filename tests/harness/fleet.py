"""The e2e fleet: the real operator (as its ServiceAccount) watching the test's namespace, an IPPool of
the test's own and a client for the test's MicroVMs; the test adds its workers with `make_worker`.

Fixtures: `fleet`, `operator_env` (a test module overrides it to change the operator's settings)
and `mikrom_operator_cluster`.
"""

from __future__ import annotations

import random
import uuid

import pytest

from mikrom import names

from . import operator_proc
from .serviceaccounts import OPERATOR
from .vms import VMs, create_pool
from .worker_proc import BROKER_DB


@pytest.fixture(scope="session")
def mikrom_operator_cluster(control_plane, worker_kubeconfig, artifacts_dir):
    """The control plane with the operator's RBAC and peering CRDs, and its kubeconfig."""
    operator_proc.install(control_plane)
    return OPERATOR.kubeconfig(control_plane, artifacts_dir / "operator" / "kubeconfig")


@pytest.fixture
def operator_env() -> dict:
    """Settings for the test's operator; a test module overrides this fixture to change them."""
    return {}


@pytest.fixture
def fleet(control_plane, kube_api, redis, mikrom_operator_cluster, namespace, artifacts_dir, operator_env,
          make_worker):
    """The real operator (watching this test's namespace, on the worker tests' Redis database), an
    IPPool of the test's own, and a client for the test's MicroVMs. At the end every MicroVM is
    deleted through the normal flow (the worker must confirm), and the operator stopped; the test's
    workers (`make_worker`, set up first so torn down last) are still there to confirm."""
    pool = "wk-" + uuid.uuid4().hex[:6]
    create_pool(kube_api, pool, f"10.{random.randint(100, 250)}.{random.randint(0, 255) & 0xF0}.0/20", 26)
    op = operator_proc.start(control_plane, redis.url(db=BROKER_DB), artifacts_dir / "operator",
                             f"operator-{namespace}", mikrom_operator_cluster, namespace=namespace,
                             env={"MIKROM_NODE_LOST_AFTER_SECONDS": "40", "MIKROM_DELETE_WAIT_SECONDS": "30",
                                  "MIKROM_PROGRESS_TIMEOUT_SECONDS": "120", **operator_env},
                             standalone=True)
    op.wait_live()
    vms = VMs(kube_api, namespace, pool)
    vms.operator = op
    yield vms
    try:
        vms.remove_all(wait=30)
    finally:
        op.stop()
        vms.delete_cluster_object(names.IPPOOLS, pool)
