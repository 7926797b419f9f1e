"""An Ingress answers on the host's loopback: through the forwarder into the cluster's namespace,
Traefik's ClusterIP Service (kube-proxy), Traefik, and the backend Service it routes to."""

from __future__ import annotations

import urllib.request
import uuid

from harness import cluster_pods
from harness.cluster import http_status
from harness.cluster_addons import INGRESS_CLASS
from harness.waits import wait_for


def get(url: str, host: str) -> tuple[int | None, str]:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except OSError as exc:
        return getattr(exc, "code", None), ""


def test_an_ingress_answers_through_the_ingress_controller_on_the_hosts_loopback(cluster, cluster_namespace):
    ns = cluster_namespace
    body = "ingress-" + uuid.uuid4().hex
    host = f"echo.{ns}.test"
    ingress = {
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "echo"},
        "spec": {"ingressClassName": INGRESS_CLASS, "rules": [{"host": host, "http": {"paths": [
            {"path": "/", "pathType": "Prefix",
             "backend": {"service": {"name": "echo", "port": {"number": 80}}}}]}}]},
    }
    assert cluster.ingress_url.startswith("http://127.0.0.1:")
    assert http_status(cluster.ingress_url + "/", host=host) == 404  # no Ingress names it yet
    cluster_pods.apply(cluster, ns, [*cluster_pods.echo_server("echo", cluster.images["operator"]["ref"], body), ingress])
    cluster_pods.wait_ready(cluster, ns, "echo")

    def answered() -> str | None:
        status, got = get(cluster.ingress_url + "/", host)
        return got if status == 200 else None

    assert wait_for(answered, 60, f"the Ingress for {host} to answer") == body
    # the route is the Ingress's host only
    assert http_status(cluster.ingress_url + "/", host=f"other.{ns}.test") == 404
