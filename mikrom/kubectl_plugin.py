"""`kubectl mikrom`: day-2 commands for MicroVMs and MicroVMNodes, as a kubectl plugin.

Installed as the console script `kubectl-mikrom`, so `kubectl mikrom ...` finds it on PATH
(kubectl's plugin naming; krew installs the same name). Every command is sugar over the patches
docs/protocol.md documents, so what the plugin does can always be done with `kubectl patch`:

  start NAME        spec.runStrategy back to what `stop` recorded in the annotation
                    mikrom.io/previousRunStrategy (else Always)
  stop NAME         spec.runStrategy Halted (the previous strategy recorded in that annotation)
  restart NAME      annotation mikrom.io/restartedAt set to now
  wait NAME         watch until --for=phase=P (or condition=Ready) holds, or --timeout
  list              the MicroVMs with node, address, shape, VMM and readiness
  cordon NODE       MicroVMNode spec.schedulable false (no new VMs are placed on it)
  uncordon NODE     spec.schedulable true
  drain NODE        cordon, stop every VM still running on the node, wait until none runs
  console NAME      the VM's serial console, interactive (Ctrl-] detaches), through the socket its
                    supervisor keeps in the node's state directory, or with --via-pod through
                    `kubectl exec -i` into the node's worker pod; --follow/--log: the log, read-only

Drain stops rather than moves: the operator takes VMs off a node only when the node is lost
(docs/protocol.md, "Heartbeats and node loss"); a Stopped VM keeps its node. After the
maintenance, `uncordon` the node and `start` the VMs drain listed (their run strategy comes back).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
import time
from pathlib import Path

from . import conditions, names

ANNOTATION_PREVIOUS_RUN_STRATEGY = "mikrom.io/previousRunStrategy"
"""Where `stop` (and `drain`) keep the run strategy that `start` restores."""
TIMEOUT = (5, 30)
"""(connect, read) timeout of every API call that is not a watch."""
G, V = names.GROUP, names.VERSION
DONE_PHASES = {names.Phase.STOPPED.value, names.Phase.SUCCEEDED.value, names.Phase.FAILED.value}
"""Phases in which no VMM runs for the VM (what drain waits for)."""


class PluginError(Exception):
    """The command cannot do what was asked; the message says why. Exit status 1."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------- API access
class Cluster:
    """The API server as the kubeconfig (or the Pod's service account) reaches it."""

    def __init__(self, kubeconfig: str | None, context: str | None):
        from kubernetes import client, config

        self.default_namespace = "default"
        if not kubeconfig and not os.environ.get("KUBECONFIG") and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            self.api_client = client.ApiClient()
        else:
            path = kubeconfig or os.environ.get("KUBECONFIG") or None
            self.api_client = config.new_client_from_config(config_file=path, context=context)
            try:
                _, active = config.list_kube_config_contexts(config_file=path)
                if context:
                    active = next((c for c in config.list_kube_config_contexts(config_file=path)[0]
                                   if c["name"] == context), active)
                self.default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
            except Exception:  # noqa: BLE001 - no namespace in the kubeconfig: kubectl's default
                pass
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def vm(self, namespace: str, name: str) -> dict:
        return self._get(lambda: self.custom.get_namespaced_custom_object(G, V, namespace, names.MICROVMS, name,
                                                                          _request_timeout=TIMEOUT),
                         f'microvm "{name}" not found in namespace "{namespace}"')

    def node(self, name: str) -> dict:
        return self._get(lambda: self.custom.get_cluster_custom_object(G, V, names.MICROVMNODES, name,
                                                                       _request_timeout=TIMEOUT),
                         f'microvmnode "{name}" not found')

    def vms(self, namespace: str | None) -> list[dict]:
        if namespace:
            res = self.custom.list_namespaced_custom_object(G, V, namespace, names.MICROVMS, _request_timeout=TIMEOUT)
        else:
            res = self.custom.list_cluster_custom_object(G, V, names.MICROVMS, _request_timeout=TIMEOUT)
        return res.get("items", [])

    def patch_vm(self, namespace: str, name: str, body: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(G, V, namespace, names.MICROVMS, name, body,
                                                          _request_timeout=TIMEOUT)

    def patch_node(self, name: str, body: dict) -> dict:
        return self.custom.patch_cluster_custom_object(G, V, names.MICROVMNODES, name, body, _request_timeout=TIMEOUT)

    @staticmethod
    def _get(read, missing: str) -> dict:
        from kubernetes.client.rest import ApiException

        try:
            return read()
        except ApiException as exc:
            if exc.status == 404:
                raise PluginError("NotFound", missing) from None
            raise


# ------------------------------------------------------------------------------- run strategy
def stop_patch(vm: dict) -> dict | None:
    """The merge patch that halts `vm` and remembers its run strategy, or None if it is Halted."""
    current = (vm.get("spec") or {}).get("runStrategy") or names.RunStrategy.ALWAYS.value
    if current == names.RunStrategy.HALTED.value:
        return None
    return {"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"],
                         "annotations": {ANNOTATION_PREVIOUS_RUN_STRATEGY: current}},
            "spec": {"runStrategy": names.RunStrategy.HALTED.value}}


def start_patch(vm: dict) -> dict | None:
    """The merge patch that gives a Halted `vm` back its recorded run strategy (else Always), or
    None if it is not Halted."""
    if (vm.get("spec") or {}).get("runStrategy") != names.RunStrategy.HALTED.value:
        return None
    recorded = ((vm["metadata"].get("annotations") or {}).get(ANNOTATION_PREVIOUS_RUN_STRATEGY))
    valid = {s.value for s in names.RunStrategy} - {names.RunStrategy.HALTED.value}
    strategy = recorded if recorded in valid else names.RunStrategy.ALWAYS.value
    return {"metadata": {"resourceVersion": vm["metadata"]["resourceVersion"],
                         "annotations": {ANNOTATION_PREVIOUS_RUN_STRATEGY: None}},
            "spec": {"runStrategy": strategy}}


def restart_patch(at: str) -> dict:
    return {"metadata": {"annotations": {names.ANNOTATION_RESTARTED_AT: at}}}


def _patch_with_retry(cluster: Cluster, namespace: str, name: str, make) -> tuple[dict, dict | None]:
    """Read, compute the patch, write it with the resourceVersion read; on 409 read again."""
    from kubernetes.client.rest import ApiException

    for _ in range(5):
        vm = cluster.vm(namespace, name)
        body = make(vm)
        if body is None:
            return vm, None
        try:
            return cluster.patch_vm(namespace, name, body), body
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise PluginError("Conflict", f"microvm {namespace}/{name} kept changing; try again")


# ------------------------------------------------------------------------------- commands
def cmd_start(cluster: Cluster, args) -> int:
    for name in args.names:
        vm, body = _patch_with_retry(cluster, args.namespace, name, start_patch)
        if body is None:
            print(f"microvm.mikrom.io/{name} not halted (runStrategy {vm['spec'].get('runStrategy', 'Always')})")
        else:
            print(f"microvm.mikrom.io/{name} started (runStrategy {body['spec']['runStrategy']})")
    return 0


def cmd_stop(cluster: Cluster, args) -> int:
    for name in args.names:
        _, body = _patch_with_retry(cluster, args.namespace, name, stop_patch)
        print(f"microvm.mikrom.io/{name} {'stopped' if body else 'already halted'}")
    return 0


def cmd_restart(cluster: Cluster, args) -> int:
    for name in args.names:
        cluster.vm(args.namespace, name)  # a clear error for a missing VM, not a 404 trace
        cluster.patch_vm(args.namespace, name, restart_patch(conditions.now_precise()))
        print(f"microvm.mikrom.io/{name} restarted")
    return 0


def parse_for(value: str) -> tuple[str, str]:
    """`phase=Running` or `condition=Ready[=True]` → (kind, wanted)."""
    kind, _, wanted = value.partition("=")
    if kind == "phase" and wanted in {p.value for p in names.Phase}:
        return "phase", wanted
    if kind == "condition" and wanted:
        return "condition", wanted if "=" in wanted else wanted + "=True"
    raise argparse.ArgumentTypeError(
        f"--for must be phase=<{'|'.join(p.value for p in names.Phase)}> or condition=<Type>[=True|False], "
        f"not {value!r}")


def holds(vm: dict, kind: str, wanted: str) -> bool:
    status = vm.get("status") or {}
    if kind == "phase":
        return status.get("phase") == wanted
    type_, _, want_status = wanted.partition("=")
    cond = conditions.get(status.get("conditions"), type_)
    return bool(cond) and cond.get("status") == want_status


def parse_duration(value: str) -> float:
    """kubectl's durations: `90`, `90s`, `5m`, `1h`."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if value and value[-1] in units:
            return float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--timeout must be a duration like 30s, 5m or 1h, not {value!r}") from None


def cmd_wait(cluster: Cluster, args) -> int:
    """A watch per VM from the resourceVersion it was read at, so no change is missed between the
    read and the watch and nothing polls."""
    from kubernetes import watch

    kind, wanted = args.for_
    deadline = time.monotonic() + args.timeout
    for name in args.names:
        vm = cluster.vm(args.namespace, name)
        while not holds(vm, kind, wanted):
            left = deadline - time.monotonic()
            if left <= 0:
                raise PluginError("Timeout", f"timed out waiting for the condition on microvms/{name} "
                                             f"({kind} {wanted}; phase {(vm.get('status') or {}).get('phase')})")
            w = watch.Watch()
            try:
                for ev in w.stream(cluster.custom.list_namespaced_custom_object, G, V, args.namespace, names.MICROVMS,
                                   field_selector=f"metadata.name={name}",
                                   resource_version=vm["metadata"]["resourceVersion"],
                                   timeout_seconds=max(1, int(left)), _request_timeout=(5, left + 5)):
                    if ev["type"] == "DELETED":
                        raise PluginError("Deleted", f"microvms/{name} was deleted while waiting")
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        vm = ev["object"]
                        if holds(vm, kind, wanted):
                            break
            except PluginError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. 410 Gone: read again and watch again
                if getattr(exc, "status", None) not in (410, None):
                    raise
                vm = cluster.vm(args.namespace, name)
            finally:
                w.stop()
        print(f"microvm.mikrom.io/{name} condition met")
    return 0


def cmd_cordon(cluster: Cluster, args) -> int:
    cluster.node(args.node)
    cluster.patch_node(args.node, {"spec": {"schedulable": False}})
    print(f"microvmnode.mikrom.io/{args.node} cordoned")
    return 0


def cmd_uncordon(cluster: Cluster, args) -> int:
    cluster.node(args.node)
    cluster.patch_node(args.node, {"spec": {"schedulable": True}})
    print(f"microvmnode.mikrom.io/{args.node} uncordoned")
    return 0


def on_node(vms: list[dict], node: str) -> list[dict]:
    return [vm for vm in vms if (vm.get("status") or {}).get("node") == node]


def still_running(vm: dict) -> bool:
    """A VMM may run (or be about to) for this VM: drain is not done with it."""
    return (vm.get("status") or {}).get("phase") not in DONE_PHASES


def cmd_drain(cluster: Cluster, args) -> int:
    from kubernetes import watch

    cmd_cordon(cluster, args)
    stopped = []
    for vm in on_node(cluster.vms(None), args.node):
        ns, name = vm["metadata"]["namespace"], vm["metadata"]["name"]
        if vm["metadata"].get("deletionTimestamp"):
            continue  # being deleted: the worker removes it anyway
        _, body = _patch_with_retry(cluster, ns, name, stop_patch)
        if body:
            stopped.append(f"{ns}/{name}")
            print(f"microvm.mikrom.io/{name} -n {ns} stopping (was runStrategy "
                  f"{body['metadata']['annotations'][ANNOTATION_PREVIOUS_RUN_STRATEGY]})")
    deadline = time.monotonic() + args.timeout
    while True:
        listing = cluster.custom.list_cluster_custom_object(G, V, names.MICROVMS, _request_timeout=TIMEOUT)
        busy = {f"{v['metadata']['namespace']}/{v['metadata']['name']}": v
                for v in on_node(listing.get("items", []), args.node) if still_running(v)}
        if not busy:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            raise PluginError("Timeout", f"timed out draining {args.node}; still running: {', '.join(sorted(busy))}")
        w = watch.Watch()
        try:
            for ev in w.stream(cluster.custom.list_cluster_custom_object, G, V, names.MICROVMS,
                               resource_version=listing["metadata"]["resourceVersion"],
                               timeout_seconds=max(1, int(left)), _request_timeout=(5, left + 5)):
                obj = ev["object"]
                key = f"{obj['metadata'].get('namespace')}/{obj['metadata'].get('name')}"
                if ev["type"] == "DELETED" or not still_running(obj) or (obj.get("status") or {}).get("node") != args.node:
                    busy.pop(key, None)
                if not busy:
                    break
        except Exception as exc:  # noqa: BLE001 - 410 Gone and the like: list again
            if getattr(exc, "status", None) not in (410, None):
                raise
        finally:
            w.stop()
    print(f"microvmnode.mikrom.io/{args.node} drained")
    if stopped:
        print("after the maintenance: kubectl mikrom uncordon " + args.node + "; then start "
              + " ".join(f"'kubectl mikrom start -n {s.split('/')[0]} {s.split('/')[1]}'" for s in stopped))
    return 0


def age(created: str | None, now: _dt.datetime | None = None) -> str:
    """kubectl's AGE: 45s, 12m, 5h, 3d."""
    secs = conditions.age_seconds(created, now)
    if secs is None:
        return "<unknown>"
    secs = max(0, int(secs))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size * (2 if unit != "d" else 1):
            return f"{secs // size}{unit}"
    return f"{secs}s"


COLUMNS = ("NAME", "PHASE", "NODE", "IP", "VCPUS", "MEMORY", "VMM", "READY", "AGE")


def row(vm: dict, all_namespaces: bool) -> list[str]:
    spec, status = vm.get("spec") or {}, vm.get("status") or {}
    ready = conditions.get(status.get("conditions"), names.READY)
    cells = [vm["metadata"]["name"], status.get("phase") or "<none>", status.get("node") or "<none>",
             status.get("ipAddress") or "<none>", str(spec.get("vcpus", 1)), f"{spec.get('memoryMiB', 512)}Mi",
             status.get("vmm") or spec.get("vmm") or "<none>", (ready or {}).get("status") or "Unknown",
             age(vm["metadata"].get("creationTimestamp"))]
    return ([vm["metadata"]["namespace"]] if all_namespaces else []) + cells


def table(vms: list[dict], all_namespaces: bool) -> str:
    header = (["NAMESPACE"] if all_namespaces else []) + list(COLUMNS)
    rows = [header] + [row(vm, all_namespaces) for vm in
                       sorted(vms, key=lambda v: (v["metadata"]["namespace"], v["metadata"]["name"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_list(cluster: Cluster, args) -> int:
    vms = cluster.vms(None if args.all_namespaces else args.namespace)
    if not vms:
        where = "" if args.all_namespaces else f" in {args.namespace} namespace"
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    print(table(vms, args.all_namespaces))
    return 0


# ------------------------------------------------------------------------------- console
def console_path(state_dir: str, uid: str) -> Path:
    if not uid or "/" in uid or uid in (".", ".."):
        raise PluginError("InvalidUid", "the MicroVM has no usable uid")
    return Path(state_dir) / "vms" / uid / "console.log"


def follow_file(path: Path, follow: bool, out=None, stop=None) -> None:
    """Print `path`, then (with `follow`) what is appended to it, across the supervisor's rotation
    (console.log renamed to console.log.1 and started afresh). Read-only."""
    out = out or sys.stdout.buffer
    f = open(path, "rb")
    try:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not follow or (stop and stop()):
                return
            try:
                rotated = os.stat(path).st_ino != os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:
                # what the supervisor wrote to the old file before it rotated comes first
                for rest in iter(lambda: f.read(65536), b""):
                    out.write(rest)
                out.flush()
                f.close()
                f = open(path, "rb")
                continue
            time.sleep(0.2)  # a plain file gives no readiness signal; this is `tail -F`'s pace
    finally:
        f.close()


def worker_pod(cluster: Cluster, node: str, namespace: str) -> str:
    pods = cluster.core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/component=worker",
                                            field_selector=f"spec.nodeName={node}", _request_timeout=TIMEOUT).items
    running = [p.metadata.name for p in pods if (p.status and p.status.phase) == "Running"]
    if not running:
        raise PluginError("NoWorkerPod", f"no running worker pod on node {node} in namespace {namespace}")
    return running[0]


DETACH = b"\x1d"
"""Ctrl-]: ends an interactive console session (telnet's escape), never sent to the guest."""
CONSOLE_SOCKET = "console.sock"
"""The supervisor's interactive console socket in the VM's state dir (worker/vmm/consolecap.py)."""
UNIX_PATH_MAX = 108


def console_socket_path(state_dir: str, uid: str) -> Path:
    return console_path(state_dir, uid).with_name(CONSOLE_SOCKET)


def connect_console(path: Path):
    """A connected socket to the VM's console; PluginError if there is none to connect to."""
    import socket

    if not path.exists():
        raise PluginError("NoConsole", f"no console socket at {path}: is the VM running, and its node's state "
                                       f"directory here? (in a cluster, use --via-pod)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    address, dirfd = str(path), None
    if len(os.fsencode(address)) >= UNIX_PATH_MAX:  # too long for sun_path: through its directory
        dirfd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        address = f"/proc/self/fd/{dirfd}/{path.name}"
    try:
        sock.connect(address)
    except PermissionError:
        sock.close()
        raise PluginError("Forbidden", f"{path} is root's: the console needs root on the node") from None
    except OSError as exc:
        sock.close()
        raise PluginError("NoConsole", f"cannot connect to {path}: {exc.strerror or exc} (is the VM running?)") from None
    finally:
        if dirfd is not None:
            os.close(dirfd)
    sock.settimeout(None)
    return sock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def interactive(remote_in: int, remote_out: int, stdin: int = 0, stdout: int = 1, banner: str = "",
                stderr: int = 2) -> bool:
    """Relay the terminal to the console: what the user types goes to `remote_out`, what comes
    from `remote_in` to the screen. The terminal is raw meanwhile (Ctrl-C and friends reach the
    guest) and restored however the session ends. True when the user detached (Ctrl-], or the end
    of stdin), False when the other side hung up (the VM stopped, or the console was busy). The
    `banner` goes to stderr once the terminal is raw (so whoever sees it may type)."""
    import select
    import termios
    import tty

    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    try:
        if saved is not None:
            tty.setraw(stdin, termios.TCSANOW)
        if banner:
            _write_all(stderr, banner.encode())
        while True:
            readable, _, _ = select.select([stdin, remote_in], [], [])
            if remote_in in readable:
                data = os.read(remote_in, 65536)
                if not data:
                    return False
                _write_all(stdout, data)
            if stdin in readable:
                data = os.read(stdin, 4096)
                if not data:
                    return True
                if DETACH in data:
                    _write_all(remote_out, data[:data.index(DETACH)])
                    return True
                _write_all(remote_out, data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def cmd_console(cluster: Cluster, args) -> int:
    vm = cluster.vm(args.namespace, args.name)
    node, uid = (vm.get("status") or {}).get("node"), vm["metadata"]["uid"]
    if not node:
        raise PluginError("NotScheduled", f"microvm {args.name} has no node yet")
    console_path(args.state_dir, uid)  # refuses a uid that would leave the state directory
    if args.follow or args.log:
        return console_log(cluster, args, node, uid)
    banner = f"Connected to the console of microvm {args.namespace}/{args.name} on {node}; Ctrl-] detaches.\r\n"
    if not args.via_pod:
        with connect_console(console_socket_path(args.state_dir, uid)) as sock:
            detached = interactive(sock.fileno(), sock.fileno(), banner=banner)
    else:
        pod = worker_pod(cluster, node, args.worker_namespace)
        argv = kubectl_argv(args) + ["exec", "-i", "-n", args.worker_namespace, pod, "--", "python", "-m",
                                     "mikrom.worker", "console-relay", uid, "--state-dir", args.pod_state_dir]
        relay = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        try:
            detached = interactive(relay.stdout.fileno(), relay.stdin.fileno(), banner=banner)
        except BrokenPipeError:
            detached = False
        finally:
            try:
                relay.stdin.close()  # the relay's stdin ends: it disconnects and exits
            except BrokenPipeError:
                pass
            try:
                relay.wait(10)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
    if detached:
        print("\ndetached", file=sys.stderr)
        return 0
    print("\nthe console closed (the VM stopped, or another client holds its console)", file=sys.stderr)
    return 1


def kubectl_argv(args) -> list[str]:
    return ["kubectl"] + (["--kubeconfig", args.kubeconfig] if args.kubeconfig else []) + \
        (["--context", args.context] if args.context else [])


def console_log(cluster: Cluster, args, node: str, uid: str) -> int:
    """The read-only console log: printed (`--log`) or followed (`--follow`)."""
    if not args.via_pod:
        path = console_path(args.state_dir, uid)
        if not path.exists():
            raise PluginError("NoConsole", f"no console log at {path}: is {node}'s state directory here? "
                                           f"(in a cluster, use --via-pod)")
        try:
            follow_file(path, args.follow)
        except KeyboardInterrupt:
            pass
        return 0
    pod = worker_pod(cluster, node, args.worker_namespace)
    rel = f"vms/{uid}/console.log"
    argv = kubectl_argv(args) + ["exec", "-n", args.worker_namespace, pod, "--", "tail", "-c", "+1"] + \
        (["-F"] if args.follow else []) + [f"{args.pod_state_dir}/{rel}"]
    try:
        return subprocess.call(argv)
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------------------- argparse
def build_parser() -> argparse.ArgumentParser:
    def options(suppress: bool) -> argparse.ArgumentParser:
        # The same options before and after the command (`kubectl mikrom -n ns list` and
        # `kubectl mikrom list -n ns`); after it they default to "not given", or argparse would
        # let the command's defaults overwrite what was given before it.
        def d(value):
            return argparse.SUPPRESS if suppress else value

        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--kubeconfig", default=d(None), help="path to the kubeconfig (default: $KUBECONFIG, ~/.kube/config)")
        common.add_argument("--context", default=d(None), help="the kubeconfig context to use")
        common.add_argument("-n", "--namespace", default=d(None), help="the MicroVMs' namespace (default: the context's)")
        common.add_argument("-A", "--all-namespaces", action="store_true", default=d(False), help="every namespace (list)")
        return common

    common = options(suppress=True)
    parser = argparse.ArgumentParser(prog="kubectl mikrom", parents=[options(suppress=False)],
                                     description="Day-2 commands for Mikrom MicroVMs and MicroVMNodes.",
                                     epilog=__doc__.split("\n\n")[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("start", cmd_start, "start a halted MicroVM (runStrategy back to the one recorded by stop, else Always)") \
        .add_argument("names", nargs="+", metavar="NAME")
    add("stop", cmd_stop, "stop a MicroVM (runStrategy Halted; the previous one is recorded)") \
        .add_argument("names", nargs="+", metavar="NAME")
    add("restart", cmd_restart, "restart a MicroVM (annotation mikrom.io/restartedAt)") \
        .add_argument("names", nargs="+", metavar="NAME")
    w = add("wait", cmd_wait, "wait (a watch) until MicroVMs reach a phase or condition")
    w.add_argument("names", nargs="+", metavar="NAME")
    w.add_argument("--for", dest="for_", metavar="CONDITION", type=parse_for, default=("phase", "Running"),
                   help="phase=<Phase> or condition=<Type>[=True|False] (default phase=Running)")
    w.add_argument("--timeout", type=parse_duration, default=30.0, help="give up after this long (default 30s)")
    add("list", cmd_list, "list MicroVMs with their node, address, shape, VMM and readiness")
    add("cordon", cmd_cordon, "mark a MicroVMNode unschedulable (spec.schedulable false)").add_argument("node", metavar="NODE")
    add("uncordon", cmd_uncordon, "mark a MicroVMNode schedulable again").add_argument("node", metavar="NODE")
    d = add("drain", cmd_drain, "cordon a MicroVMNode, stop its MicroVMs and wait until none runs")
    d.add_argument("node", metavar="NODE")
    d.add_argument("--timeout", type=parse_duration, default=300.0, help="give up after this long (default 5m)")
    c = add("console", cmd_console, "attach to a MicroVM's serial console (Ctrl-] detaches); with --follow or "
                                     "--log read its console log instead, read-only")
    c.add_argument("name", metavar="NAME")
    c.add_argument("-f", "--follow", action="store_true", help="read-only: print the console log and keep printing what the guest writes")
    c.add_argument("--log", action="store_true", help="read-only: print the console log and exit")
    c.add_argument("--state-dir", default=os.environ.get("MIKROM_STATE_DIR", "/var/lib/mikrom"),
                   help="the node's state directory, when the node is this machine (default $MIKROM_STATE_DIR or /var/lib/mikrom)")
    c.add_argument("--via-pod", action="store_true", help="reach it through `kubectl exec -i` in the node's worker pod")
    c.add_argument("--worker-namespace", default="mikrom", help="namespace of the worker DaemonSet (default mikrom)")
    c.add_argument("--pod-state-dir", default="/var/lib/mikrom", help="the state directory inside the worker pod")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = Cluster(args.kubeconfig, args.context)
        args.namespace = args.namespace or cluster.default_namespace
        return args.func(cluster, args) or 0
    except PluginError as exc:
        print(f"error: {exc} ({exc.reason})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
