"""A real Kubernetes control plane on loopback: kine (SQLite) or etcd, and kube-apiserver with
RBAC authorization, service-account token signing and an admin client certificate."""

from __future__ import annotations

import base64
import contextlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import binaries, procs
from .waits import wait_for


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d: Path) -> None:
    """A CA, an admin client certificate (group system:masters) and the service-account keys."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=mikrom-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "admin.key", "-out", "admin.csr",
             "-subj", "/O=system:masters/CN=mikrom-admin", cwd=d)
    _openssl("x509", "-req", "-in", "admin.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "admin.crt", "-days", "3650", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def issue_cert(d: Path, name: str, subject: str, sans: list[str] = (), server: bool = False) -> None:
    """`name.key` and `name.crt` in `d`, signed by the CA that make_pki() made there: a client
    certificate, or with `server` a serving one for `sans` (`IP:10.0.0.1`, `DNS:kubernetes`)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    ext = d / f"{name}.ext"
    lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
             f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}"]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    ext.write_text("\n".join(lines) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "3650", "-extfile", ext.name, cwd=d)


@dataclass
class ControlPlane:
    workdir: Path
    kubeconfig: Path
    server: str
    processes: list

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60,
                as_user: str | None = None) -> subprocess.CompletedProcess:
        argv = [str(binaries.require("kubectl")), "--kubeconfig", str(self.kubeconfig), "--request-timeout=30s"]
        if as_user:
            argv.append(f"--as={as_user}")
        res = subprocess.run(argv + list(args), input=input, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({res.returncode}): {res.stderr}{res.stdout}")
        return res

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    @contextlib.contextmanager
    def apiserver_stopped(self, ready_timeout: float = 120):
        """kill -9 the kube-apiserver (its storage stays up) for the block; then start it again on
        the same port with the same flags, certificates and storage, and wait until it is ready,
        so the kubeconfigs and tokens made before work again. Yields the stopped process."""
        i, old = next((i, p) for i, p in enumerate(self.processes) if p.name == "kube-apiserver")
        old.kill()
        try:
            yield old
        finally:
            new = procs.start(old.name, old.extra["argv"], old.log.parent)
            new.extra.update(old.extra)
            self.processes[i] = new
            procs.STARTED[:] = [new if p is old else p for p in procs.STARTED]
            wait_ready(self, new, timeout=ready_timeout)


def _kubeconfig(path: Path, server: str, pki: Path, ca: Path | None = None) -> None:
    write_kubeconfig(path, server, pki / "admin.crt", pki / "admin.key", ca=ca)


def write_kubeconfig(path: Path, server: str, cert: Path, key: Path, ca: Path | None = None,
                     user: str = "admin") -> None:
    """A kubeconfig for `server` that logs in with a client certificate; it trusts `ca`, or with
    none skips verification (until the server's own certificate exists)."""
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "mikrom-test", "cluster": (
            {"server": server, "certificate-authority-data": b64(ca)} if ca
            else {"server": server, "insecure-skip-tls-verify": True})}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
        "contexts": [{"name": "mikrom-test", "context": {"cluster": "mikrom-test", "user": user}}],
        "current-context": "mikrom-test",
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)


def start(workdir: Path) -> ControlPlane:
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    make_pki(pki)
    logs = workdir / "logs"
    started = []
    try:
        store_port = procs.free_port()
        etcd = binaries.find("etcd", build=False) if _wants_etcd() else None
        if etcd:
            peer = procs.free_port()
            store = procs.start("etcd", [str(etcd), "--data-dir", str(workdir / "etcd"),
                                         "--listen-client-urls", f"http://127.0.0.1:{store_port}",
                                         "--advertise-client-urls", f"http://127.0.0.1:{store_port}",
                                         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                         "--initial-cluster", f"default=http://127.0.0.1:{peer}",
                                         "--unsafe-no-fsync"], logs)
        else:
            store = procs.start("kine", [str(binaries.require("kine")),
                                         "--listen-address", f"127.0.0.1:{store_port}",
                                         "--metrics-bind-address", "0",
                                         "--endpoint", f"sqlite://{workdir}/state.db?_journal=WAL&cache=shared&_busy_timeout=30000"],
                                logs)
        started.append(store)
        procs.wait_port(store_port, 60, store)

        port = procs.free_port()
        certs = workdir / "serving"
        apiserver = procs.start("kube-apiserver", [
            str(binaries.require("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{store_port}",
            f"--cert-dir={certs}",
            f"--secure-port={port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--authorization-mode=RBAC",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ], logs)
        apiserver.extra["argv"] = apiserver.popen.args  # to start it again (apiserver_stopped)
        started.append(apiserver)
        server = f"https://127.0.0.1:{port}"
        kubeconfig = workdir / "kubeconfig"
        _kubeconfig(kubeconfig, server, pki)
        cp = ControlPlane(workdir=workdir, kubeconfig=kubeconfig, server=server, processes=started)
        wait_ready(cp, apiserver, timeout=120)
        # kube-apiserver made its own serving certificate (for 127.0.0.1 and localhost): trust it
        # from now on instead of skipping verification
        _kubeconfig(kubeconfig, server, pki, ca=certs / "apiserver.crt")
        cp.kubectl("get", "--raw", "/readyz")
        return cp
    except BaseException:
        for p in reversed(started):
            p.stop()
        raise


def _wants_etcd() -> bool:
    import os
    return bool(os.environ.get("TEST_ASSET_ETCD") or (os.environ.get("KUBEBUILDER_ASSETS") and
                                                       Path(os.environ["KUBEBUILDER_ASSETS"], "etcd").is_file()))


def wait_ready(cp: ControlPlane, proc, timeout: float) -> None:
    last = [""]

    def ready() -> bool:
        res = cp.kubectl("get", "--raw", "/readyz", check=False, timeout=30)
        last[0] = res.stderr or res.stdout
        # the RBAC bootstrap roles must exist before tests bind to them
        return (res.returncode == 0 and res.stdout.strip() == "ok"
                and cp.kubectl("get", "clusterrole", "view", check=False).returncode == 0)

    try:
        wait_for(ready, timeout, "kube-apiserver to be ready", interval=0.5,
                 abort=lambda: None if proc.alive() else f"kube-apiserver exited:\n{proc.tail()}")
    except TimeoutError as exc:
        raise type(exc)(f"{exc}: {last[0]}\n{proc.tail()}") from None
