"""Settings, read from the environment (`MIKROM_*`), each declared once with its default.

Defaults follow DESIGN.md. `Settings.from_env()` builds the whole object; the operator and the
worker read only the parts they need.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field, fields


def _env_name(name: str) -> str:
    return "MIKROM_" + name.upper()


def _coerce(raw: str, kind: type):
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is int:
        return int(raw)
    if kind is float:
        return float(raw)
    return raw


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Each field's environment variable is MIKROM_<FIELD> in capitals."""

    # broker and its credentials (secret fields are masked in repr(); see docs/security.md)
    broker_url: str = field(default="redis://localhost:6379/0", metadata={"secret": "url"})
    """Redis URL of the Celery broker: `redis://`, `rediss://` (TLS) or `sentinel://` (several
    joined by `;`); the password inside the URL, or `redis_password`."""
    result_backend: str = field(default="", metadata={"secret": "url"})
    """Celery result backend; empty: the broker URL."""
    redis_password: str = field(default="", repr=False, metadata={"secret": "value"})
    """Password added to `broker_url`/`result_backend` when they carry none (from a Secret)."""
    redis_timeout_seconds: float = 5.0
    """Socket and connect timeout for every Redis call."""
    broker_allow_no_password: bool = False
    """Let the operator, worker, beat and Flower start with a broker or result backend that has no
    password (a throwaway Redis on loopback). Off: they refuse to start. Anyone who can write to
    the broker can send tasks to every node."""
    broker_ca_file: str = ""
    """CA bundle that verifies the certificate of a `rediss://` broker and result backend; empty:
    the system's CAs."""
    broker_cert_reqs: str = "required"
    """Certificate check of a `rediss://` broker: `required` (verified against the CA, and the
    host name), `optional` or `none` (encrypted but unauthenticated; for tests only)."""
    broker_cert_file: str = ""
    """Client certificate for a `rediss://` broker that asks for one (`tls-auth-clients`)."""
    broker_key_file: str = ""
    """Private key of `broker_cert_file`."""
    broker_sentinel_master: str = "mymaster"
    """Name of the monitored master when `broker_url`/`result_backend` are `sentinel://` URLs."""

    task_time_limit: int = 300
    """Hard time limit of a task, seconds (the original guide's default)."""
    task_soft_time_limit: int = 280
    """Soft time limit of a task, seconds (the original guide's default)."""
    # worker shutdown
    worker_shutdown_idle_seconds: float = 20.0
    """A worker told to stop (SIGTERM) exits this long after its last running task finished, if
    Celery's own shutdown has not ended by then (it can hang reconnecting to a Redis that is gone)."""
    result_expires_seconds: int = 86400
    """How long task results stay in Redis."""
    sync_interval_seconds: float = 30.0
    """Period of `sync_vm_status` (broadcast to every node)."""

    log_format: str = "text"
    """Worker log lines: `text` (Celery's format) or `json` (one object per line, as the operator
    writes them)."""
    metrics_port: int = 9464
    """Port of the Prometheus endpoint (`/metrics`) of the operator or the worker; 0: none."""
    metrics_address: str = "0.0.0.0"
    """Address the Prometheus endpoint listens on."""

    # operator
    namespace: str = ""
    """Watch only this namespace for MicroVMs; empty: all namespaces."""
    node_lost_after_seconds: float = 40.0
    """A node whose heartbeat is older than this is NotReady and its VMs Unknown."""
    self_fence_after_seconds: float = 60.0
    """A worker that cannot heartbeat for this long stops its own VMs."""
    progress_timeout_seconds: float = 120.0
    """A VM in a transitional phase with no worker progress this long is re-dispatched."""
    reschedule_lost_vms: bool = True
    """Place `runStrategy` Always and RerunOnFailure MicroVMs not pinned by `nodeName` on another
    node once theirs has sent no heartbeat for `selfFenceAfterSeconds` + `rescheduleMarginSeconds`
    (its worker has stopped them by then). The lost node removes its copy when it returns."""
    reschedule_margin_seconds: float = 30.0
    """Margin past `selfFenceAfterSeconds` before a lost node's VMs are placed elsewhere (clock
    skew, the worker's heartbeat period)."""
    # operator: brake on mass eviction
    reschedule_max_lost_fraction: float = 0.5
    """Hold all rescheduling while more than this share of the MicroVMNodes is lost at once (1 of 2
    is not more than 0.5, so a two-node cluster still fails over); the VMs stay Unknown with
    condition ReschedulingHeld."""
    reschedule_max_lost_nodes: int = 0
    """Also hold rescheduling while more than this many MicroVMNodes are lost at once (0: no
    absolute limit)."""
    max_dispatch_attempts: int = 4
    """Dispatches of one intent before the VM is marked Failed (reason NoProgress)."""
    dispatch_backoff_seconds: float = 5.0
    """First delay between re-dispatches; doubles each time, with jitter."""
    delete_wait_seconds: float = 60.0
    """How long a delete waits for the worker before a lost node or force-delete removes the finalizer."""
    reconcile_interval_seconds: float = 10.0
    """Period of the operator's level-triggered check of each MicroVM and MicroVMNode."""
    default_pool_block_size: int = 26
    """Block size when an IPPool names none."""
    operator_workers: int = 16
    """Threads the operator runs its synchronous handlers in (kopf's executor)."""
    peering_priority: int = 0
    """kopf peering priority of this replica; 0: a random one, so that of two replicas exactly one is active."""
    peering_lifetime_seconds: int = 60
    """How long a replica that stopped renewing its peering record still counts as alive (kill -9 failover time)."""

    # worker
    node_name: str = field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname())
    """Name of this node's MicroVMNode (NODE_NAME from the downward API)."""
    state_dir: str = "/var/lib/mikrom"
    """Where VM state lives (`vms/<uid>/`) and the image cache (`images/`)."""
    image_dir: str = "/var/lib/mikrom/images"
    """Image `path`s are relative to this directory and may not leave it."""
    heartbeat_seconds: float = 10.0
    """How often the worker renews its MicroVMNode heartbeat."""
    # worker: fencing (worker/lease.py, worker/fence.py, worker/peers.py)
    fence_peer_window_seconds: float = 20.0
    """A peer counts as alive, and as reaching the API server, if it said so in Redis this recently.
    A worker that cannot write its heartbeat keeps its VMs' lease only while some live peer exists
    and none of them wrote to the API server within this window (a control-plane outage). Keep it
    well below `selfFenceAfterSeconds` minus twice the heartbeat period."""
    fence_kill_after_seconds: float = 5.0
    """A supervisor whose lease expired asks its VMM to stop (SIGTERM) and kills it this much later."""
    capacity_vcpus: int = 0
    """vCPUs offered to VMs; 0: the host's CPU count."""
    capacity_memory_mib: int = 0
    """Memory offered to VMs in MiB; 0: 90% of the host's memory."""
    default_vmm: str = ""
    """VMM used when a MicroVM names none; empty: firecracker when usable, else qemu."""
    qemu_binary: str = "qemu-system-x86_64"
    """QEMU executable (name on PATH or absolute path)."""
    firecracker_binary: str = "firecracker"
    """Firecracker executable (name on PATH or absolute path)."""
    jailer_binary: str = ""
    """Firecracker's `jailer`; when set, every Firecracker VMM runs jailed (chroot, its VM's own
    uid/gid from `vm_uid_range_*`, its own cgroup v2). Empty: Firecracker runs unjailed as the
    worker's user."""
    # worker: the VMM sandbox (worker/vmm/sandbox.py)
    vm_uid_range_start: int = 200000
    """First uid (and gid) of the range VMMs run as: each VM on the node gets one of its own,
    recorded in its state directory and kept until the VM is deleted. Keep the range clear of
    host accounts and of container user-namespace ranges (/etc/subuid)."""
    vm_uid_range_size: int = 65536
    """Size of that range: the most VMs a node can hold."""
    vmm_seccomp: bool = True
    """QEMU runs with `-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,
    resourcecontrol=deny` (a seccomp filter). Off only for a QEMU built without seccomp."""
    vmm_unprivileged: bool = True
    """QEMU runs as its VM's own uid/gid, handed its files, tap and control socket as descriptors.
    Under KVM, /dev/kvm must then be usable by a group (mode 0660, e.g. `kvm`). Off: QEMU runs as
    root (a guest that escapes QEMU owns the node)."""
    jailer_chroot_base: str = "/srv/jailer"
    """Jails live in <jailer_chroot_base>/firecracker/<VM uid>/root."""
    jailer_cgroup_limits: bool = True
    """Cap each jailed VMM's cgroup (v2) at the VM's vCPUs (`cpu.max`) and memory (`memory.max`,
    plus 64 MiB for Firecracker itself)."""
    boot_timeout_seconds: float = 60.0
    """How long a VM may take to print its ready signal."""
    stop_timeout_seconds: float = 15.0
    """How long a graceful stop may take before the VMM is killed."""
    image_max_bytes: int = 4 << 30
    """Largest image a URL may download."""
    image_download_timeout_seconds: float = 240.0
    """Timeout of one image download; below the task's hard time limit, so a slow download fails
    with ImageDownloadFailed instead of being cut off."""
    # image URLs: which addresses a tenant's download may reach (worker/urlguard.py)
    image_url_allowed_cidrs: str = ""
    """Comma-separated CIDRs an image URL's host (and every redirect's) may resolve to although
    they are loopback, link-local, private or otherwise not public, e.g. the Service range of an
    in-cluster image server (`10.96.0.0/12`). Empty: image URLs reach public addresses only."""
    console_max_bytes: int = 1 << 20
    """Size cap of each VM's console log."""
    bridge: str = "mikrombr0"
    """Name of the node's bridge."""
    netns: str = ""
    """Network namespace (`ip netns` name) holding the bridge, taps, NAT and VMMs; empty: the host's."""

    # worker: VM network isolation (worker/netpolicy.py)
    vm_network_isolation: bool = True
    """Filter what VMs send with nftables: each VM only from its own MAC and IPv4 address (no
    IPv6), to no address of the node itself, to none of `vm_denied_cidrs`, `cluster_service_cidr`
    and `cluster_pod_cidr`, and over the bridge only to VMs of its own namespace. False: no filter
    (every VM of the node on one flat bridge); for development only."""
    vm_denied_cidrs: str = "169.254.0.0/16"
    """Comma-separated IPv4 ranges no VM may reach, besides the cluster's Services and Pods.
    Link-local covers the cloud metadata services (169.254.169.254); add the node's own networks
    (other hosts, the API server) to keep VMs off them."""
    cluster_service_cidr: str = "10.96.0.0/12"
    """The cluster's Service range (kube-apiserver `--service-cluster-ip-range`; kubeadm's default),
    denied to VMs before and after kube-proxy's DNAT. Empty: not denied."""
    cluster_pod_cidr: str = "10.244.0.0/16"
    """The cluster's Pod range (kube-controller-manager `--cluster-cidr`), denied to VMs. Empty:
    not denied."""
    vm_allowed_cidrs: str = ""
    """Comma-separated IPv4 ranges VMs may reach although they lie in a denied range (e.g. one
    Service address they are meant to use)."""
    vm_cross_namespace_traffic: bool = False
    """Let VMs of different namespaces on one node reach each other over the bridge (by default
    only VMs of the same namespace do)."""

    # beat tasks: what they touch comes from here, never from the message
    orphan_min_age_seconds: float = 300.0
    """`cleanup_old_vms` removes a state directory, VMM process or tap with no MicroVM assigned to
    this node only once it is this old, so nothing a task is creating right now is mistaken for one."""
    report_namespace: str = ""
    """Namespace of `generate_report`'s ConfigMap; empty: the worker's own (POD_NAMESPACE), else `mikrom`."""

    # worker: the VMMs' host cgroups (worker/hostcgroup.py)
    host_cgroups: bool = True
    """Run each VMM and its supervisor in a cgroup of their own under the host's cgroup root
    (below), so VMs outlive the worker's pod and their RAM is never charged to it. False: VMMs stay
    in the worker's own cgroup and die with its pod (a worker outside Kubernetes, without root)."""
    host_cgroup_root: str = "/sys/fs/cgroup"
    """The host's cgroup mount as the worker sees it (in the pod: a hostPath of the host's
    /sys/fs/cgroup, mounted at /sys/fs/cgroup so that Firecracker's jailer finds it too)."""
    host_cgroup_parent: str = "mikrom"
    """Each VMM and its supervisor run in the group <parent>/<VM uid> of every host hierarchy,
    capped at the VM's vCPUs and memory plus `host_cgroup_memory_overhead_mib`."""
    host_cgroup_memory_overhead_mib: int = 256
    """Memory a VM's group allows beyond the guest's: the VMM's own (QEMU's device models and,
    under TCG, its translation cache; Firecracker needs under 5 MiB) and the supervisor's."""

    # worker: a create that arrives before its placement is recorded (docs/protocol.md, Dispatch)
    placement_wait_seconds: float = 10.0
    """How long a create on this node's queue whose MicroVM names no node yet waits (watching that
    one object) for `status.node`: the operator sends the create just before writing the
    placement. This node → acted on; another node, none by then, or the object gone → dropped."""

    @classmethod
    def from_env(cls, env: dict | None = None) -> "Settings":
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None and raw != "":
                kind = f.type if isinstance(f.type, type) else {"str": str, "int": int, "float": float,
                                                                   "bool": bool}[str(f.type)]
                values[f.name] = _coerce(raw, kind)
        return cls(**values)

    def replace(self, **changes) -> "Settings":
        return dataclasses.replace(self, **changes)

    @property
    def broker(self) -> str:
        """The broker URL with its password: for Celery and Redis clients only, never to print."""
        return _with_password(self.broker_url, self.redis_password)

    @property
    def backend(self) -> str:
        """The result backend URL with its password (as `broker`)."""
        return _with_password(self.result_backend or self.broker_url, self.redis_password)

    def __repr__(self) -> str:
        """Every field, with passwords masked: settings end up in logs and tracebacks."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            secret = f.metadata.get("secret")
            if secret == "url":
                value = masked_url(value)
            elif secret and value:
                value = MASK
            shown.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    __str__ = __repr__


# ---------------------------------------------------------------------- broker URLs and passwords

MASK = "********"


def _with_password(url: str, password: str) -> str:
    """`url` (or each of a `;`-joined list) with `password` added where it carries none."""
    if not password:
        return url
    return ";".join(_one_with_password(part, password) for part in url.split(";"))


def _one_with_password(url: str, password: str) -> str:
    if "//" not in url or "@" in url.split("//", 1)[-1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("//", 1)
    from urllib.parse import quote
    return f"{scheme}//:{quote(password, safe='')}@{rest}"


def masked_url(url: str) -> str:
    """`url` (or each of a `;`-joined list) with its password replaced by a mask."""
    from urllib.parse import urlsplit, urlunsplit

    out = []
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
        except ValueError:
            out.append(MASK)
            continue
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
        query = "&".join(f"{k}={MASK}" if "pass" in k.lower() else f"{k}={v}" if sep else k
                         for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item))
        out.append(urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment)))
    return ";".join(out)


def url_password(url: str) -> str:
    """The password `url` carries (in its user info or a `password` query parameter), or ''."""
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    netloc = parts.netloc
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        if ":" in userinfo:
            return unquote(userinfo.split(":", 1)[1])
    return (parse_qs(parts.query).get("password") or [""])[0]
