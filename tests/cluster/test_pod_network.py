"""Pods of the built operator image use the cluster's network as the operator will: the API server
as the `kubernetes` Service with the pod's own ServiceAccount token, Service names through CoreDNS,
and other pods through ClusterIP Services (kube-proxy's iptables rules)."""

from __future__ import annotations

import json
import uuid

import pytest

from harness import cluster_pods

API_CLIENT = """
import json
from kubernetes import client
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
cfg = client.Configuration()
cfg.host = "https://kubernetes.default.svc"   # by name: CoreDNS, and the serving certificate's name
cfg.ssl_ca_cert = sa + "/ca.crt"
cfg.api_key = {"authorization": "Bearer " + open(sa + "/token").read()}
api = client.ApiClient(cfg)
ns = open(sa + "/namespace").read()
me = client.AuthenticationV1Api(api).create_self_subject_review(
    client.V1SelfSubjectReview(), _request_timeout=10).status.user_info.username
pods = sorted(p.metadata.name for p in client.CoreV1Api(api).list_namespaced_pod(ns, _request_timeout=10).items)
try:
    client.CoreV1Api(api).list_namespaced_secret(ns, _request_timeout=10)
    secrets = "allowed"
except client.ApiException as exc:
    secrets = exc.status
print(json.dumps({"user": me, "pods": pods, "secrets": secrets}))
"""

RESOLVE = """
import json, socket, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, 80, socket.AF_INET, socket.SOCK_STREAM)})
    except socket.gaierror as exc:
        out[name] = "error: " + str(exc)
print(json.dumps(out))
"""

FETCH = """
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
    print(json.dumps({"status": resp.status, "body": resp.read().decode()}))
"""


@pytest.fixture(scope="module")
def pods(cluster):
    """A namespace with an echo server behind the Service `echo` and a client pod running as the
    ServiceAccount `reader`, which may read pods (and nothing else) in its namespace."""
    ns = "ct-net-" + uuid.uuid4().hex[:6]
    image = cluster.images["operator"]["ref"]
    body = "echo-" + uuid.uuid4().hex
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "serviceaccount", "reader", "-n", ns)
    cluster.kubectl("create", "role", "pod-reader", "-n", ns, "--verb=get,list", "--resource=pods")
    cluster.kubectl("create", "rolebinding", "reader", "-n", ns, "--role=pod-reader", f"--serviceaccount={ns}:reader")
    client_pod = cluster_pods.sleeper("client", image, serviceAccountName="reader")
    cluster_pods.apply(cluster, ns, [client_pod, *cluster_pods.echo_server("echo", image, body)])
    cluster_pods.wait_ready(cluster, ns, "client", "echo")
    service_ip = cluster.kubectl("get", "service", "echo", "-n", ns, "-o", "jsonpath={.spec.clusterIP}").stdout
    yield {"ns": ns, "body": body, "service_ip": service_ip}
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_a_pod_reaches_the_api_server_by_service_name_as_its_own_service_account(cluster, pods):
    out = cluster_pods.python_in(cluster, pods["ns"], "client", API_CLIENT)
    assert out["user"] == f"system:serviceaccount:{pods['ns']}:reader"
    assert out["pods"] == ["client", "echo"]
    # RBAC holds: the token is the pod's, with only what its Role grants
    assert out["secrets"] == 403


def test_a_pod_resolves_service_names_through_coredns(cluster, pods):
    ns = pods["ns"]
    names = ["echo", f"echo.{ns}.svc.cluster.local", "kubernetes.default.svc", "no-such-service"]
    res = cluster_pods.exec_in(cluster, ns, "client", "python3", "-c", RESOLVE, *names)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["echo"] == [pods["service_ip"]]
    assert out[f"echo.{ns}.svc.cluster.local"] == [pods["service_ip"]]
    assert out["kubernetes.default.svc"] == ["10.96.0.1"]
    assert out["no-such-service"].startswith("error"), out
    resolv = cluster_pods.exec_in(cluster, ns, "client", "cat", "/etc/resolv.conf").stdout
    assert "nameserver 10.96.0.10" in resolv


def test_a_pod_reaches_another_pod_through_its_cluster_ip(cluster, pods):
    ns = pods["ns"]
    pod_ip = cluster.kubectl("get", "pod", "echo", "-n", ns, "-o", "jsonpath={.status.podIP}").stdout
    assert pod_ip and pod_ip != pods["service_ip"]
    res = cluster_pods.exec_in(cluster, ns, "client", "python3", "-c", FETCH, f"http://{pods['service_ip']}/")
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"status": 200, "body": pods["body"]}
