"""Pods for the cluster tests: manifests of the project's images, applying them, waiting for them and
running commands in them (`kubectl exec`), all through the real API server and kubelet."""

from __future__ import annotations

import json
import subprocess

from .waits import wait_for

ECHO_SERVER = """
import http.server, os
body = os.environ["ECHO_BODY"].encode()
class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Echo).serve_forever()
"""
"""A web server answering every GET with $ECHO_BODY, in the operator image's Python."""


def pod(name: str, image: str, command: list[str], labels: dict | None = None, env: dict | None = None,
        **spec) -> dict:
    """A Pod running `command` in `image` (loaded into the node: never pulled), on the KVM node."""
    container = {"name": name, "image": image, "imagePullPolicy": "Never", "command": command,
                 "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {"containers": [container], "terminationGracePeriodSeconds": 1,
                     "nodeSelector": {"mikrom.io/kvm": "true"}, **spec}}


def sleeper(name: str, image: str, **spec) -> dict:
    """A pod that only waits, to `kubectl exec` into."""
    return pod(name, image, ["python3", "-c", "import time; time.sleep(10**7)"], **spec)


def echo_server(name: str, image: str, body: str) -> list[dict]:
    """The echo server pod and a ClusterIP Service `name` for it (port 80)."""
    return [
        pod(name, image, ["python3", "-c", ECHO_SERVER], env={"ECHO_BODY": body},
            container={"readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}),
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
         "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}},
    ]


def apply(cluster, namespace: str, objects: list[dict]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def wait_ready(cluster, namespace: str, *pods: str, timeout: float = 120) -> None:
    def ready() -> bool:
        res = cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "--timeout=5s",
                              *[f"pod/{p}" for p in pods], check=False, timeout=30)
        return res.returncode == 0
    try:
        wait_for(ready, timeout, f"pods {pods} Ready in {namespace}", interval=0.5)
    except TimeoutError:
        described = cluster.kubectl("describe", "pods", "-n", namespace, *pods, check=False).stdout
        raise AssertionError(f"pods {pods} not Ready in {timeout}s:\n{described[-4000:]}") from None


def exec_in(cluster, namespace: str, pod_name: str, *argv: str, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
    """`argv` in the pod's (first) container, through kube-apiserver and kubelet."""
    return cluster.kubectl("exec", "-n", namespace, pod_name, "--", *argv, timeout=timeout, check=check)


def python_in(cluster, namespace: str, pod_name: str, script: str, timeout: float = 120) -> dict:
    """Run `script` with the pod's python3; it prints one JSON object last, which is returned."""
    res = exec_in(cluster, namespace, pod_name, "python3", "-c", script, timeout=timeout)
    return json.loads(res.stdout.strip().splitlines()[-1])
