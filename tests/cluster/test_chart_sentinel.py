"""The chart's Redis with Sentinel on the real cluster: three Redis pods, each with its Sentinel,
pod 0 the first master; every component on `sentinel://` URLs with the master's name; and after
the master's pod is deleted, the Sentinels elect a replica, the returning pod joins as a replica
of the new master, and the worker still answers `celery inspect ping` through the Sentinels; then
`helm uninstall` leaves no pod well within the worker's grace period.

Redis is hack/images.sh's image (Debian's redis-server; the chart's default, docker.io/library/redis,
needs a registry), its password from a Secret the test made (`redis.auth.existingSecret`).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from harness import binaries, cluster_pods
from harness.waits import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mikrom"
GRACE_SECONDS = yaml.safe_load((CHART / "values.yaml").read_text())["worker"]["terminationGracePeriodSeconds"]
UNINSTALL_BOUND = 90
"""Seconds from `helm uninstall` to no pod left (see test_chart_install.py)."""


def _ref(image: dict) -> tuple[str, str]:
    repository, tag = image["ref"].rsplit(":", 1)
    return repository, tag


@pytest.fixture(scope="module")
def sentinel_release(cluster, tmp_path_factory):
    name = "st" + uuid.uuid4().hex[:6]
    namespace = f"{name}-system"
    values = {"images": {}, "redis": {"sentinel": {"enabled": True}, "persistence": {"enabled": False},
                                      "auth": {"existingSecret": "broker", "existingSecretPasswordKey": "password"}},
              "operator": {"replicas": 1}, "beat": {"enabled": False}, "flower": {"enabled": False},
              "ipPool": {"create": False}, "worker": {"admissionPolicy": {"enabled": False}}}
    # a short failover: the test waits for it
    values["redis"]["sentinel"].update({"downAfterMilliseconds": 3000, "failoverTimeoutMilliseconds": 10000})
    for component in ("operator", "worker"):
        repository, tag = _ref(cluster.images[component])
        values["images"][component] = {"repository": repository, "tag": tag, "pullPolicy": "Never"}
    repository, tag = _ref(cluster.images["redis"])
    values["redis"]["image"] = {"repository": repository, "tag": tag, "pullPolicy": "Never"}
    state = Path("/var/lib/mikrom-test") / name  # the worker's state: not under /tmp (the chart refuses it)
    values["worker"].update({"stateDir": str(state), "imageDir": str(state / "images"),
                             "hostCgroup": {"parent": cluster.layout.cgroup_root.strip("/") + "/mikrom-vms"}})
    path = tmp_path_factory.mktemp("sentinel") / "values.yaml"
    path.write_text(yaml.safe_dump(values))

    def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(binaries.require("helm")), "--kubeconfig", str(cluster.kubeconfig), *args],
                             capture_output=True, text=True, timeout=900)
        if check and out.returncode != 0:
            pods = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
            raise AssertionError(f"helm {' '.join(args)}: {out.stderr}\n{pods}")
        return out

    cluster.kubectl("create", "namespace", namespace)
    password = path.parent / "password"
    password.write_text(secrets.token_hex(16))
    password.chmod(0o600)
    cluster.kubectl("create", "secret", "generic", "broker", "-n", namespace, f"--from-file=password={password}")
    password.unlink()
    helm("install", name, str(CHART), "-n", namespace, "-f", str(path), "--wait", "--timeout", "10m")
    yield {"name": name, "namespace": namespace, "helm": helm}
    helm("uninstall", name, "-n", namespace, "--wait", "--timeout", "3m", check=False)
    cluster.kubectl("patch", "microvmnode", "mikrom-node", "--type=merge", "-p", '{"metadata": {"finalizers": null}}',
                    check=False)
    cluster.kubectl("delete", "microvmnode", "mikrom-node", "--ignore-not-found", check=False)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    shutil.rmtree(state, ignore_errors=True)


def _pods(cluster, ns: str, component: str) -> list[dict]:
    out = cluster.kubectl("get", "pods", "-n", ns, "-l", f"app.kubernetes.io/component={component}", "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def _role(cluster, ns: str, pod: str) -> str:
    res = cluster.kubectl("exec", "-n", ns, pod, "-c", "redis", "--", "sh", "-c",
                          "redis-cli -h 127.0.0.1 role | head -n 1", check=False)
    return res.stdout.strip()


def _master_by_sentinels(cluster, ns: str, pod: str, master: str = "mymaster") -> str:
    res = cluster.kubectl("exec", "-n", ns, pod, "-c", "sentinel", "--", "redis-cli", "-p", "26379", "sentinel",
                          "get-master-addr-by-name", master, check=False)
    return (res.stdout.split() or [""])[0]


def _worker_pings(cluster, ns: str) -> bool:
    pods = _pods(cluster, ns, "worker")
    if not pods:
        return False
    res = cluster_pods.exec_in(cluster, ns, pods[0]["metadata"]["name"], "sh", "-c",
                               'celery -A mikrom.celery_app inspect ping -d "mikrom@$NODE_NAME" --timeout 5',
                               check=False, timeout=60)
    return res.returncode == 0


def test_sentinel_mode_runs_a_master_two_replicas_and_the_components_through_the_sentinels(cluster,
                                                                                          sentinel_release):
    ns, name = sentinel_release["namespace"], sentinel_release["name"]
    wait_for(lambda: len([p for p in _pods(cluster, ns, "redis") if _ready(p)]) == 3, 300, "3 Redis pods Ready")
    roles = {p["metadata"]["name"]: _role(cluster, ns, p["metadata"]["name"]) for p in _pods(cluster, ns, "redis")}
    assert roles == {f"{name}-mikrom-redis-0": "master", f"{name}-mikrom-redis-1": "slave",
                     f"{name}-mikrom-redis-2": "slave"}, roles
    for pod in roles:
        assert _master_by_sentinels(cluster, ns, pod).startswith(f"{name}-mikrom-redis-0."), pod
    (worker,) = _pods(cluster, ns, "worker")
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env["MIKROM_BROKER_URL"].startswith("sentinel://") and env["MIKROM_BROKER_SENTINEL_MASTER"] == "mymaster"
    wait_for(lambda: _worker_pings(cluster, ns), 300, "the worker to answer pings through the Sentinels")


def test_after_the_masters_pod_goes_a_replica_takes_over_and_the_worker_still_answers(cluster, sentinel_release):
    ns, name = sentinel_release["namespace"], sentinel_release["name"]
    old_master = f"{name}-mikrom-redis-0"
    cluster.kubectl("delete", "pod", old_master, "-n", ns, "--wait=true", timeout=120)

    def new_master() -> str | None:
        for i in (1, 2):
            found = _master_by_sentinels(cluster, ns, f"{name}-mikrom-redis-{i}")
            if found and not found.startswith(old_master + "."):
                return found
        return None

    elected = wait_for(new_master, 120, "the Sentinels to elect a new master")
    wait_for(lambda: len([p for p in _pods(cluster, ns, "redis") if _ready(p)]) == 3, 300, "pod 0 back and Ready")
    # a returning pod that started before the election saw itself named master; the Sentinels turn
    # it into a replica of the one they elected
    wait_for(lambda: _role(cluster, ns, old_master) == "slave", 90, "the returning pod to replicate the new master")
    wait_for(lambda: _master_by_sentinels(cluster, ns, old_master) == elected, 60, "its Sentinel to agree")
    wait_for(lambda: _worker_pings(cluster, ns), 180, "the worker to answer pings through the new master")


def test_helm_uninstall_of_the_sentinel_release_leaves_no_pod_well_within_the_workers_grace_period(
        cluster, sentinel_release):
    ns, name = sentinel_release["namespace"], sentinel_release["name"]
    t0 = time.monotonic()
    sentinel_release["helm"]("uninstall", name, "-n", ns, "--wait", "--timeout", "3m")

    def left() -> list[str]:
        items = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
        return [p["metadata"]["name"] for p in items]
    assert UNINSTALL_BOUND < GRACE_SECONDS / 3
    wait_for(lambda: not left(), UNINSTALL_BOUND - (time.monotonic() - t0),
             f"no pod left in {ns} {UNINSTALL_BOUND} s after helm uninstall (grace {GRACE_SECONDS} s)")
