"""The test cluster's add-ons as manifests: CoreDNS behind the `kube-dns` Service and Traefik as the
ingress controller (an IngressClass `traefik`, its Service at a fixed ClusterIP that the host-side
forwarder targets). Pure functions of the images to run; `cluster.py` applies them.

Neither forwards anything out of the cluster: CoreDNS answers only for `cluster.local` (there is
no upstream resolver to reach from the cluster's namespace), and Traefik serves only Ingresses.
"""

from __future__ import annotations

from .cluster_config import CLUSTER_DOMAIN, DNS_SERVICE_IP, INGRESS_SERVICE_IP

NAMESPACE = "kube-system"
INGRESS_CLASS = "traefik"

COREFILE = f""".:53 {{
    errors
    health {{
        lameduck 0s
    }}
    ready
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loop
    reload
}}
"""


def _meta(name: str, **extra) -> dict:
    return {"name": name, "namespace": NAMESPACE, **extra}


def _cluster_rbac(name: str, rules: list[dict]) -> list[dict]:
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": f"mikrom:{name}"},
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"mikrom:{name}"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"mikrom:{name}"},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]},
    ]


def _deployment(name: str, labels: dict, image: str, args: list[str], ports: list[dict], probe: dict,
                volumes: list[dict] = (), mounts: list[dict] = (), dns_policy: str = "ClusterFirst") -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, labels=labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": name,
                    "priorityClassName": "system-cluster-critical",
                    "dnsPolicy": dns_policy,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": name, "image": image, "imagePullPolicy": "Never", "args": args,
                        "ports": ports, "readinessProbe": {**probe, "periodSeconds": 1},
                        "volumeMounts": list(mounts),
                        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True},
                    }],
                    "volumes": list(volumes),
                },
            },
        },
    }


def coredns(image: str) -> list[dict]:
    labels = {"k8s-app": "kube-dns"}
    rules = [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ]
    return [
        *_cluster_rbac("coredns", rules),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("coredns"), "data": {"Corefile": COREFILE}},
        _deployment("coredns", labels, image, ["-conf", "/etc/coredns/Corefile"],
                    [{"name": "dns", "containerPort": 53, "protocol": "UDP"},
                     {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"}],
                    {"httpGet": {"path": "/ready", "port": 8181}},
                    volumes=[{"name": "config", "configMap": {"name": "coredns"}}],
                    mounts=[{"name": "config", "mountPath": "/etc/coredns", "readOnly": True}],
                    # CoreDNS itself must not be pointed at CoreDNS
                    dns_policy="Default"),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("kube-dns", labels=labels),
         "spec": {"selector": labels, "clusterIP": DNS_SERVICE_IP,
                  "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}},
    ]


def traefik(image: str) -> list[dict]:
    labels = {"app.kubernetes.io/name": "traefik"}
    # what Traefik's kubernetesIngress provider reads and writes (as Traefik's own chart grants it)
    rules = [
        {"apiGroups": [""], "resources": ["services", "secrets", "nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]},
    ]
    args = [
        "--entryPoints.web.address=:8000",
        "--entryPoints.traefik.address=:9000",
        "--ping=true",
        "--providers.kubernetesingress=true",
        "--global.checkNewVersion=false",
        "--global.sendAnonymousUsage=false",
        "--log.level=INFO",
    ]
    return [
        *_cluster_rbac("traefik", rules),
        {"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
         "metadata": {"name": INGRESS_CLASS, "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
         "spec": {"controller": "traefik.io/ingress-controller"}},
        _deployment("traefik", labels, image, args,
                    [{"name": "web", "containerPort": 8000}, {"name": "traefik", "containerPort": 9000}],
                    {"httpGet": {"path": "/ping", "port": 9000}}),
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta("traefik", labels=labels),
         "spec": {"selector": labels, "clusterIP": INGRESS_SERVICE_IP,
                  "ports": [{"name": "web", "port": 80, "targetPort": "web"}]}},
    ]


def manifests(images: dict) -> list[dict]:
    """Every add-on object, given `{"coredns": {"ref": ...}, "traefik": {"ref": ...}}`."""
    return coredns(images["coredns"]["ref"]) + traefik(images["traefik"]["ref"])
