"""What the one-node test cluster is made of, as pure data: where each part keeps its files, which
certificates it needs, and the configuration and command line of every process.

Nothing here runs anything; `cluster.py` starts the processes this module describes. Every path a
part writes to lies under `Layout.state`, so removing that directory (after unmounting what
containerd and kubelet mounted below it) removes everything the cluster wrote.

Addresses: the whole cluster lives in a network namespace of its own with no route out. Inside it
the node's address is `NODE_IP`, a /32 on the namespace's loopback (kubelet refuses a loopback
node address, and nothing outside the namespace can reach it); kine and the components' health and
metrics ports listen on the namespace's 127.0.0.1; kube-apiserver and kubelet on the node address,
which the pods reach through the CNI bridge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

NODE_IP = "10.255.255.1"
POD_CIDR = "10.244.0.0/24"
BRIDGE_IP = "10.244.0.1"
SERVICE_CIDR = "10.96.0.0/24"
KUBERNETES_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
INGRESS_SERVICE_IP = "10.96.0.80"
"""The ingress controller's Service: fixed, so the host-side forwarder can target it before it exists."""
APISERVER_PORT = 6443
KINE_PORT = 2379
BRIDGE = "mkcl0"
NODE_NAME = "mikrom-node"
NODE_LABELS = {"mikrom.io/kvm": "true"}
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = Path("/usr/lib/cni")
"""Debian's containernetworking-plugins."""


@dataclass(frozen=True)
class Layout:
    """One cluster: its id (unique on this machine), its state directory and its pod sandbox image."""

    cluster_id: str
    state: Path
    pause_image: str
    logs: Path | None = None
    bins: dict = field(default_factory=dict, compare=False)
    """Component name -> binary path (kube-apiserver, kubelet, ..., containerd)."""

    @property
    def netns(self) -> str:
        return f"mkcl-{self.cluster_id}"

    @property
    def netns_path(self) -> Path:
        return Path("/var/run/netns") / self.netns

    @property
    def cgroup_root(self) -> str:
        """kubelet's cgroupRoot, created beforehand in every hierarchy (kubelet does not)."""
        return f"/mikrom-cluster-{self.cluster_id}"

    @property
    def cni_network(self) -> str:
        return f"mikrom-{self.cluster_id}"

    @property
    def log_dir(self) -> Path:
        return self.logs or self.state / "logs"

    @property
    def pki(self) -> Path:
        return self.state / "pki"

    @property
    def containerd_dir(self) -> Path:
        return self.state / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def containerd_config(self) -> Path:
        return self.containerd_dir / "config.toml"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni" / "net.d"

    @property
    def kubelet_dir(self) -> Path:
        return self.state / "kubelet"

    @property
    def kubeconfig(self) -> Path:
        """The host side's admin kubeconfig (through the forwarder)."""
        return self.state / "kubeconfig"

    def component_kubeconfig(self, component: str) -> Path:
        return self.state / "kubeconfigs" / f"{component}.kubeconfig"

    def bin(self, name: str) -> str:
        return str(self.bins[name])


# ---------------------------------------------------------------------------------------- PKI
def certificates() -> list[tuple[str, str, list[str], bool]]:
    """(file name, subject, subjectAltNames, serving?) for every certificate beyond make_pki()'s CA,
    admin and service-account keys."""
    api_sans = [f"IP:{NODE_IP}", "IP:127.0.0.1", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:localhost", "DNS:kubernetes",
                "DNS:kubernetes.default", "DNS:kubernetes.default.svc", f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}"]
    return [
        ("apiserver", "/CN=kube-apiserver", api_sans, True),
        # kube-apiserver's client certificate towards kubelet (logs, exec), allowed everything there
        ("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", [], False),
        ("kubelet", f"/CN=system:node:{NODE_NAME}", [f"IP:{NODE_IP}", f"DNS:{NODE_NAME}"], True),
        ("node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", [], False),
        ("controller-manager", "/CN=system:kube-controller-manager", [], False),
        ("scheduler", "/CN=system:kube-scheduler", [], False),
        ("kube-proxy", "/CN=system:kube-proxy", [], False),
    ]


COMPONENT_CERTS = {"controller-manager": "controller-manager", "scheduler": "scheduler", "kubelet": "node",
                   "kube-proxy": "kube-proxy"}
"""Which client certificate each in-namespace component's kubeconfig carries."""


# ---------------------------------------------------------------------------------------- commands
def kine_argv(lay: Layout) -> list[str]:
    return [lay.bin("kine"), "--listen-address", f"127.0.0.1:{KINE_PORT}", "--metrics-bind-address", "0",
            "--endpoint", f"sqlite://{lay.state}/kine/state.db?_journal=WAL&cache=shared&_busy_timeout=30000"]


def apiserver_argv(lay: Layout) -> list[str]:
    pki = lay.pki
    return [
        lay.bin("kube-apiserver"),
        f"--etcd-servers=http://127.0.0.1:{KINE_PORT}",
        f"--bind-address={NODE_IP}",
        f"--advertise-address={NODE_IP}",
        f"--secure-port={APISERVER_PORT}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--cert-dir={lay.state / 'apiserver'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        "--authorization-mode=Node,RBAC",
        # ServiceAccount is on by default; NodeRestriction limits kubelet to its own node and pods
        "--enable-admission-plugins=NodeRestriction",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allow-privileged=true",
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        # the node has no DNS name anyone could resolve: logs and exec go to its InternalIP
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_argv(lay: Layout) -> list[str]:
    kc = lay.component_kubeconfig("controller-manager")
    pki = lay.pki
    return [
        lay.bin("kube-controller-manager"),
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--allocate-node-cidrs=false",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_argv(lay: Layout) -> list[str]:
    kc = lay.component_kubeconfig("scheduler")
    return [lay.bin("kube-scheduler"), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", "--leader-elect=false",
            "--profiling=false", "--v=1"]


def containerd_argv(lay: Layout) -> list[str]:
    return [lay.bin("containerd"), "--config", str(lay.containerd_config)]


def kubelet_argv(lay: Layout) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in NODE_LABELS.items())
    return [lay.bin("kubelet"), f"--config={lay.kubelet_dir / 'config.yaml'}",
            f"--kubeconfig={lay.component_kubeconfig('kubelet')}", f"--root-dir={lay.kubelet_dir / 'root'}",
            f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}", f"--node-labels={labels}", "--v=1"]


def kube_proxy_argv(lay: Layout) -> list[str]:
    return [lay.bin("kube-proxy"), f"--config={lay.state / 'kube-proxy' / 'config.yaml'}", "--v=1"]


# ---------------------------------------------------------------------------------------- configs
def containerd_config(lay: Layout) -> str:
    """containerd's own config (TOML, version 2): its root, state, socket and CNI dirs under the
    state dir, never the system containerd's."""
    d = lay.containerd_dir
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{lay.containerd_socket}"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"

[{cri}]
  sandbox_image = "{lay.pause_image}"
  # Testbed: no CAP_SYS_RESOURCE here, so a negative oom_score_adj cannot be set, and kubelet asks
  # -998 for every sandbox (runc then fails with "can't get final child's PID from pipe: EOF").
  # containerd's own knob clamps every container's adjustment at containerd's (0).
  restrict_oom_score_adj = true
  # pod network namespaces under the state dir, not /var/run/netns, so removing it removes them
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_tls_streaming = false
  disable_apparmor = true

  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{lay.cni_conf_dir}"
    max_conf_num = 1

  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's own state under the state dir too (by default it joins the system containerd's)
        Root = "{d / 'runc'}"
"""


def cni_conflist(lay: Layout) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": lay.cni_network,
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False,
             # without hairpin a pod cannot reach itself through its own Service
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(lay.state / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
            {"type": "loopback"},
        ],
    }


def kubelet_config(lay: Layout) -> dict:
    pki = lay.pki
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # this machine has cgroup v1 (hybrid); kubelet 1.34 refuses it unless told otherwise
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": lay.cgroup_root,
        "containerRuntimeEndpoint": f"unix://{lay.containerd_socket}",
        "address": NODE_IP,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(pki / "kubelet.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        # the host's resolvers are unreachable from the namespace anyway: give pods none of them
        "resolvConf": "",
        "podLogsDir": str(lay.kubelet_dir / "pod-logs"),
        # no CAP_SYS_RESOURCE here: kubelet's default -999 for itself cannot be set
        "oomScoreAdj": 0,
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 40,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "0s",
        "staticPodPath": "",
        "shutdownGracePeriod": "0s",
        "runtimeRequestTimeout": "2m",
    }


def kube_proxy_config(lay: Layout) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(lay.component_kubeconfig("kube-proxy"))},
        "hostnameOverride": NODE_NAME,
        "bindAddress": NODE_IP,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clusterCIDR": POD_CIDR,
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # the conntrack table size is a host-wide setting: leave it alone
        "conntrack": {"maxPerCore": 0, "min": 0},
        # no CAP_SYS_RESOURCE here (see kubelet_config)
        "oomScoreAdj": 0,
        "iptables": {"localhostNodePorts": False},
    }


def to_json(data: dict) -> str:
    """kubelet and kube-proxy read YAML, of which JSON is a subset."""
    return json.dumps(data, indent=2) + "\n"
