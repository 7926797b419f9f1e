"""The test cluster's generated configuration: what it listens on and where it writes."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

from harness import cluster_addons, cluster_config
from harness.cluster_config import NODE_IP, Layout

STATE = Path("/tmp/mikrom-cluster-unit")
BINS = {name: f"/opt/bin/{name}" for name in ("kine", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                               "kubelet", "kube-proxy", "containerd")}
LAYOUT = Layout(cluster_id="0123abcd", state=STATE, pause_image="localhost/mikrom/pause:x", bins=BINS)
READ_ONLY = [Path("/opt/bin"), cluster_config.CNI_BIN_DIR, Path("/var/run/netns")]
"""Paths the cluster reads but never writes: binaries, the CNI plugins, the namespace's handle."""


def everything() -> str:
    """Every argv, config file and manifest the cluster uses, as one text."""
    argvs = [cluster_config.kine_argv(LAYOUT), cluster_config.apiserver_argv(LAYOUT),
             cluster_config.controller_manager_argv(LAYOUT), cluster_config.scheduler_argv(LAYOUT),
             cluster_config.containerd_argv(LAYOUT), cluster_config.kubelet_argv(LAYOUT),
             cluster_config.kube_proxy_argv(LAYOUT)]
    docs = [cluster_config.kubelet_config(LAYOUT), cluster_config.kube_proxy_config(LAYOUT),
            cluster_config.cni_conflist(LAYOUT), *cluster_addons.manifests({"coredns": {"ref": "c"}, "traefik": {"ref": "t"}})]
    return "\n".join([json.dumps(argvs), cluster_config.containerd_config(LAYOUT), *map(json.dumps, docs)])


def test_every_path_the_cluster_names_is_under_its_state_dir_or_read_only():
    text = everything()
    paths = {Path(p) for p in re.findall(r"(?<![\w.:/])(/(?:[\w.@-]+/?)+)", text)}
    # cgroup paths are kubelet's cgroupRoot, removed by cluster.down; URL paths are not files
    paths -= {Path(LAYOUT.cgroup_root), Path("/ready"), Path("/ping"), Path("/etc/coredns"),
              Path("/etc/coredns/Corefile")}
    outside = [p for p in paths if not any(p.is_relative_to(base) for base in [STATE, *READ_ONLY])]
    assert outside == [], outside


def test_every_address_a_component_listens_on_is_loopback_or_the_node_address_inside_the_namespace():
    text = everything()
    listen = re.findall(r'(?:bind-address|listen-address|advertise-address|[Aa]ddress|BindAddress)"?\s*[=:,]\s*"?'
                        r'(\d+\.\d+\.\d+\.\d+)', text)
    assert listen, "no listen address found: the pattern is stale"
    for addr in listen:
        assert ipaddress.ip_address(addr).is_loopback or addr == NODE_IP, addr
    # containerd serves only on unix sockets under the state dir
    grpc = re.search(r'\[grpc\]\s+address = "([^"]+)"', cluster_config.containerd_config(LAYOUT)).group(1)
    assert Path(grpc).is_relative_to(STATE)


def test_the_node_address_is_private_and_outside_the_pod_and_service_ranges():
    node = ipaddress.ip_address(NODE_IP)
    assert node.is_private and not node.is_loopback
    for cidr in (cluster_config.POD_CIDR, cluster_config.SERVICE_CIDR):
        assert node not in ipaddress.ip_network(cidr)
    services = ipaddress.ip_network(cluster_config.SERVICE_CIDR)
    for ip in (cluster_config.KUBERNETES_SERVICE_IP, cluster_config.DNS_SERVICE_IP, cluster_config.INGRESS_SERVICE_IP):
        assert ipaddress.ip_address(ip) in services


def test_the_apiserver_certificate_names_every_way_it_is_reached():
    sans = dict((name, sans) for name, _, sans, _ in cluster_config.certificates())["apiserver"]
    # the pods (Service IP and name), the node (its address) and the host (the forwarder on loopback)
    for san in (f"IP:{cluster_config.KUBERNETES_SERVICE_IP}", "DNS:kubernetes.default.svc", f"IP:{NODE_IP}",
                "IP:127.0.0.1"):
        assert san in sans
