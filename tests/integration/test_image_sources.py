"""Image sources as a tenant names them, against real parts: the API server's schema, real HTTP
servers on loopback, a real `mikrom worker` process writing status and Events, and a network
namespace with no route out for the addresses no test may send to from the host.

What is checked: only http(s) URLs; a URL reaches loopback, link-local or private addresses only
when the node allows the range, checked on the address the connection goes to (redirects too); no
message tells the tenant a fetched digest, a remote status or what a port did; and a `path` that
is a FIFO cannot block the worker.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from harness import netns as netns_tools
from harness.microvms import T, MicroVMClient
from harness.procs import free_port, wait_for
from kubernetes.client.rest import ApiException

from mikrom import names
from mikrom.worker import images, urlguard

KERNEL = b"\x7fELF not really a kernel, but bytes to verify " * 1000
KERNEL_SHA = hashlib.sha256(KERNEL).hexdigest()
LOOPBACK = urlguard.parse_cidrs("127.0.0.0/8")
DOWNLOAD_FAILED = "spec.image.kernel.url: the download failed"
NOT_ALLOWED = "spec.image.kernel.url: the URL's host is not allowed"


class Web:
    """A real HTTP server on a loopback address: per path a file, a redirect or a bare status;
    every request is recorded (path and headers) before it is answered."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None):
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, dict]] = []
        self.server_names: list[str | None] = []
        """The TLS server name (SNI) of each handshake, with `tls` = (certificate, key)."""
        self._lock = threading.Lock()
        web = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with web._lock:
                    web.requests.append((self.path, dict(self.headers)))
                route = self.path.split("?", 1)[0]
                status, headers, body = web.routes.get(route, (404, {}, b"no such file here"))
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            context.sni_callback = lambda sock, name, ctx: self.server_names.append(name)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.host = host
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def file(self, path: str, body: bytes) -> str:
        self.routes[path] = (200, {}, body)
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = (status, {"Location": location}, b"")
        return self.url(path)

    def status(self, path: str, status: int, body: bytes = b"") -> str:
        self.routes[path] = (status, {}, body)
        return self.url(path)

    @property
    def hits(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web():
    servers: list[Web] = []

    def make(host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None) -> Web:
        servers.append(Web(host, tls))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _fetch(url: str, tmp_path: Path, sha256: str = KERNEL_SHA, allowed=()):
    return images.fetch(url, sha256, tmp_path / "cache", timeout=20, field="spec.image.kernel.url",
                        allowed_cidrs=allowed)


def _cached(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


# ------------------------------------------------------------------------- the API server's schema

class ImageVMs(MicroVMClient):
    """The test's MicroVMs: a QEMU VM that starts (so the node resolves its images) unless told."""

    def manifest(self, name: str, kernel: dict | None = None, strategy: str = "Always", **spec) -> dict:
        image = {"kernel": kernel or {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "vmm": "qemu", "runStrategy": strategy, "image": image, **spec}}

    def events(self, name: str) -> list:
        items = self.core.list_namespaced_event(self.ns, _request_timeout=T).items
        return [e for e in items if e.involved_object.name == name]


@pytest.fixture
def vms(mikrom_cluster, kube_api, namespace) -> ImageVMs:
    return ImageVMs(kube_api, namespace)


@pytest.mark.parametrize("url", ["file:///etc/hostname", "FILE:///etc/shadow", "ftp://images.example.com/vmlinux",
                                 "gopher://images.example.com/", "/etc/hostname"])
def test_the_api_server_refuses_a_url_that_is_not_http_or_https_naming_the_field(vms, url):
    with pytest.raises(ApiException) as err:
        vms.create("hostfile", kernel={"url": url, "sha256": "0" * 64})
    assert err.value.status == 422
    assert "spec.image.kernel.url" in err.value.body
    assert vms.get("hostfile") is None


# ------------------------------------------------------------------------- downloads from loopback servers

def test_a_loopback_url_is_refused_by_default_before_any_request(web, tmp_path):
    server = web()
    url = server.file("/vmlinux", KERNEL)
    for refused in (url, server.url("/vmlinux", host="localhost"), server.url("/vmlinux", host="127.1"),
                    server.url("/vmlinux", host="2130706433"), server.url("/vmlinux", host="[::ffff:127.0.0.1]")):
        with pytest.raises(images.ImageRefused) as err:
            _fetch(refused, tmp_path)
        assert str(err.value) == NOT_ALLOWED and err.value.reason == "InvalidSpec"
    assert server.hits == [], "a refused URL must not reach the server at all"
    assert _cached(tmp_path) == []


def test_with_the_allow_list_naming_loopback_the_download_is_made_and_cached(web, tmp_path):
    server = web()
    url = server.file("/vmlinux", KERNEL)
    path = _fetch(url, tmp_path, allowed=LOOPBACK)
    assert path.read_bytes() == KERNEL and _cached(tmp_path) == [KERNEL_SHA]
    assert server.hits == ["/vmlinux"]
    # the Host header keeps what the URL named; the connection went to the address that was checked
    assert server.requests[0][1]["Host"] == f"127.0.0.1:{server.port}"


def test_a_name_is_sent_as_the_host_header_while_the_connection_goes_to_the_checked_address(web, tmp_path,
                                                                                              monkeypatch):
    import socket

    checked, other = web("127.0.0.1"), web("127.0.0.2")
    checked.file("/vmlinux", KERNEL)
    other.file("/vmlinux", KERNEL)
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1"] + ["127.0.0.2"] * 10)  # a rebinding resolver: allowed first, then not

    def rebinding(host, port, *args, **kwargs):
        if host == "images.rebind.test":
            ip = next(answers)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    path = _fetch(f"http://images.rebind.test:{checked.port}/vmlinux", tmp_path,
                  allowed=urlguard.parse_cidrs("127.0.0.1/32"))
    assert path.read_bytes() == KERNEL
    assert checked.hits == ["/vmlinux"] and other.hits == []
    assert checked.requests[0][1]["Host"] == f"images.rebind.test:{checked.port}"


def _resolving(monkeypatch, names: dict[str, str]) -> None:
    """The test process's resolver answers `names` (name -> address) itself, everything else as before."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_https_keeps_the_name_for_sni_and_the_certificate_check_while_connecting_to_the_checked_address(
        web, tmp_path, monkeypatch):
    server = web(tls=_self_signed(tmp_path, "images.tls.test"))
    server.file("/vmlinux", KERNEL)
    _resolving(monkeypatch, {"images.tls.test": "127.0.0.1", "other.tls.test": "127.0.0.1"})
    url = f"https://images.tls.test:{server.port}/vmlinux"
    # a certificate the node does not trust fails like any download
    with pytest.raises(images.ImageDownloadFailed) as err:
        _fetch(url, tmp_path, allowed=LOOPBACK)
    assert str(err.value) == DOWNLOAD_FAILED and server.requests == []
    assert server.server_names == ["images.tls.test"]

    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))  # trusted from now on
    assert _fetch(url, tmp_path, allowed=LOOPBACK).read_bytes() == KERNEL
    assert server.requests[-1][1]["Host"] == f"images.tls.test:{server.port}"
    # the same address under a name the certificate does not carry
    with pytest.raises(images.ImageDownloadFailed):
        _fetch(f"https://other.tls.test:{server.port}/vmlinux", tmp_path / "other", allowed=LOOPBACK)
    assert server.server_names[-1] == "other.tls.test" and len(server.requests) == 1


def test_a_redirect_to_a_refused_address_is_refused_and_its_target_never_asked(web, tmp_path):
    allowed_server, target = web("127.0.0.1"), web("127.0.0.2")
    target.file("/vmlinux", KERNEL)
    only_first = urlguard.parse_cidrs("127.0.0.1/32")
    for location in (target.url("/vmlinux"), target.url("/vmlinux", host="2130706434"),
                     f"http://127.2:{target.port}/vmlinux", f"http://[::1]:{target.port}/vmlinux"):
        url = allowed_server.redirect(f"/to-{uuid.uuid4().hex[:6]}", location)
        with pytest.raises(images.ImageRefused) as err:
            _fetch(url, tmp_path, allowed=only_first)
        assert str(err.value) == "spec.image.kernel.url: the URL redirects to a host that is not allowed"
    url = allowed_server.redirect("/to-file", "file:///etc/hostname", status=301)
    with pytest.raises(images.ImageRefused, match="redirects to a URL that is not allowed"):
        _fetch(url, tmp_path, allowed=only_first)
    assert target.hits == []
    assert _cached(tmp_path) == []


def test_allowed_redirects_are_followed_up_to_a_limit(web, tmp_path):
    first, second = web("127.0.0.1"), web("127.0.0.3")
    final = second.file("/vmlinux", KERNEL)
    url = first.redirect("/start", second.redirect("/hop", final, status=307), status=301)
    assert _fetch(url, tmp_path, allowed=LOOPBACK).read_bytes() == KERNEL
    assert first.hits == ["/start"] and second.hits == ["/hop", "/vmlinux"]

    loop = first.redirect("/loop", "/loop")
    with pytest.raises(images.ImageDownloadFailed) as err:
        _fetch(loop, tmp_path, sha256="1" * 64, allowed=LOOPBACK)
    assert str(err.value) == DOWNLOAD_FAILED
    assert first.hits.count("/loop") == images.MAX_REDIRECTS + 1


def test_credentials_in_a_url_go_to_its_own_origin_only(web, tmp_path):
    first, second = web("127.0.0.1"), web("127.0.0.4")
    final = second.file("/vmlinux", KERNEL)
    first.redirect("/private", final)
    first.file("/direct", KERNEL)
    _fetch(f"http://reader:s3cret@127.0.0.1:{first.port}/direct", tmp_path, allowed=LOOPBACK)
    assert first.requests[-1][1]["Authorization"] == "Basic cmVhZGVyOnMzY3JldA=="
    (tmp_path / "cache").rename(tmp_path / "cache-1")
    _fetch(f"http://reader:s3cret@127.0.0.1:{first.port}/private", tmp_path, allowed=LOOPBACK)
    assert "Authorization" not in second.requests[-1][1]


def test_a_wrong_sha256_says_only_that_it_does_not_match_and_caches_nothing(web, tmp_path):
    server = web()
    url = server.file("/vmlinux", KERNEL)
    declared = hashlib.sha256(b"what the tenant claims").hexdigest()
    with pytest.raises(images.ChecksumMismatch) as err:
        _fetch(url, tmp_path, sha256=declared, allowed=LOOPBACK)
    assert str(err.value) == "spec.image.kernel.url: sha256 does not match"
    assert KERNEL_SHA not in str(err.value)
    assert _cached(tmp_path) == [] and not list((tmp_path / "cache").rglob("*.part"))


def test_a_closed_port_and_any_http_error_give_one_and_the_same_message(web, tmp_path):
    server = web()
    forbidden = server.status("/forbidden", 403, b"Forbidden: internal admin console, ask ops@")
    broken = server.status("/broken", 500, b"Traceback (most recent call last): secret stuff")
    missing = server.url("/missing")
    closed = f"http://127.0.0.1:{free_port()}/vmlinux"
    messages = set()
    for url in (forbidden, broken, missing, closed):
        with pytest.raises(images.ImageDownloadFailed) as err:
            _fetch(url, tmp_path, allowed=LOOPBACK)
        assert err.value.reason == "ImageDownloadFailed"
        # no chained exception either, whose text a traceback in a log would show
        assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
        messages.add(str(err.value))
    assert messages == {DOWNLOAD_FAILED}


# ------------------------------------------------------------------------- addresses no test may send to

@pytest.fixture
def isolated(netns):
    """The test's network namespace (only loopback, no route anywhere) with its own /etc/hosts,
    which `ip netns exec` mounts over /etc/hosts for what it runs."""
    etc = Path("/etc/netns") / netns
    etc.mkdir(parents=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n"
                               "169.254.169.254 metadata.test\n"
                               "10.20.30.40 internal.test\n"
                               "93.184.216.34 mixed.test\n"
                               "172.16.5.5 mixed.test\n"
                               "fd00::5 ula.test\n"
                               "93.184.216.34 public.test\n")
    yield netns
    (etc / "hosts").unlink()
    etc.rmdir()
    try:
        etc.parent.rmdir()
    except OSError:
        pass  # other namespaces' files are there


FETCH_IN_NAMESPACE = """
import json, sys, tempfile
from mikrom.worker import images
out = {}
for url in json.loads(sys.argv[1]):
    try:
        images.fetch(url, "0" * 64, tempfile.mkdtemp(), timeout=10, field="spec.image.kernel.url")
        out[url] = ["fetched", ""]
    except images.ImageError as exc:
        out[url] = [type(exc).__name__, str(exc)]
print(json.dumps(out))
"""


def _fetch_inside(netns: str, urls: list[str]) -> dict:
    assert netns_tools.run(netns, "ip", "route", "show").stdout.strip() == "", "no route may leave the namespace"
    res = netns_tools.run(netns, sys.executable, "-c", FETCH_IN_NAMESPACE, json.dumps(urls), timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_private_link_local_and_metadata_addresses_and_names_for_them_are_refused(isolated):
    urls = ["http://169.254.169.254/latest/meta-data/iam/", "http://[::ffff:a9fe:a9fe]/latest/",
            "http://10.0.0.1/vmlinux", "http://172.16.0.1/vmlinux", "http://192.168.1.1/vmlinux",
            "http://100.64.0.1/vmlinux", "http://[fe80::1]/vmlinux", "http://[fc00::1]/vmlinux",
            "http://metadata.test/latest/", "http://internal.test:8080/vmlinux", "http://mixed.test/vmlinux",
            "http://ula.test/vmlinux", "http://localhost/vmlinux"]
    results = _fetch_inside(isolated, urls)
    assert results == {url: ["ImageRefused", NOT_ALLOWED] for url in urls}


def test_a_public_address_passes_the_check_and_an_unreachable_one_fails_without_saying_why(isolated):
    # inside the namespace nothing is reachable: the connect fails at once (no route), and the
    # message is the same as for any failed download
    urls = ["http://public.test/vmlinux", "http://93.184.216.34/vmlinux", "http://no-such-name.test/vmlinux"]
    results = _fetch_inside(isolated, urls)
    assert results == {url: ["ImageDownloadFailed", DOWNLOAD_FAILED] for url in urls}


# ------------------------------------------------------------------------- a real worker

def _place(vms: ImageVMs, name: str, node: str, celery_client, **spec) -> dict:
    vm = vms.create(name, **spec)
    vms.patch_status(name, {"node": node, "phase": "Scheduled"})
    celery_client.send_task(names.CREATE_VM, queue=names.node_queue(node),
                            kwargs={"namespace": vms.ns, "name": name, "uid": vm["metadata"]["uid"], "intent": "create"})
    return vm


def _failed(vms: ImageVMs, name: str, reason: str) -> dict:
    return wait_for(lambda: (st := vms.status(name)).get("reason") == reason and st, 60, f"{name} to fail with {reason}")


def _warning(vms: ImageVMs, name: str, reason: str):
    return wait_for(lambda: next((e for e in vms.events(name) if e.reason == reason and e.type == "Warning"), None),
                    20, f"a {reason} Warning event on {name}")


def test_a_worker_refuses_a_loopback_url_without_a_request_and_says_only_that_the_host_is_not_allowed(
        make_worker, netns, vms, celery_client, web):
    worker = make_worker(netns=netns, sync_interval_seconds=300)
    server = web()
    url = server.file("/vmlinux", KERNEL)
    _place(vms, "loopy", worker.node, celery_client, kernel={"url": url, "sha256": KERNEL_SHA})
    st = _failed(vms, "loopy", "InvalidSpec")
    assert st["phase"] == "Failed" and st["message"] == NOT_ALLOWED
    event = _warning(vms, "loopy", "InvalidSpec")
    assert event.message.startswith(NOT_ALLOWED)
    assert server.hits == []


def test_a_worker_reports_a_closed_port_and_an_http_403_alike_and_logs_no_secret(
        make_worker, netns, vms, celery_client, web):
    worker = make_worker(netns=netns, sync_interval_seconds=300, image_url_allowed_cidrs="127.0.0.0/8")
    server = web()
    forbidden = server.status("/vmlinux", 403, b"Forbidden: this is the admin console")
    closed_port = free_port()
    secret = "u:s3cret-pass@"
    _place(vms, "forbidden", worker.node, celery_client,
           kernel={"url": forbidden.replace("http://", "http://" + secret) + "?token=q-secret", "sha256": KERNEL_SHA})
    _place(vms, "closed", worker.node, celery_client,
           kernel={"url": f"http://{secret}127.0.0.1:{closed_port}/vmlinux?token=q-secret", "sha256": KERNEL_SHA})
    first = _failed(vms, "forbidden", "ImageDownloadFailed")
    second = _failed(vms, "closed", "ImageDownloadFailed")
    assert first["message"] == second["message"] == f"{DOWNLOAD_FAILED}; retrying"
    assert _warning(vms, "forbidden", "ImageDownloadFailed").message == \
        _warning(vms, "closed", "ImageDownloadFailed").message
    assert server.hits, "the allowed server was asked"
    log = worker.log_text()
    for leak in ("s3cret-pass", "q-secret", "Connection refused", "Errno 111", "Forbidden", "admin console"):
        assert leak not in log, f"the worker's log shows {leak!r}"


def test_a_worker_reports_a_wrong_sha256_without_any_digest_and_caches_nothing(
        make_worker, netns, vms, celery_client, web):
    worker = make_worker(netns=netns, sync_interval_seconds=300, image_url_allowed_cidrs="127.0.0.1/32")
    server = web()
    url = server.file("/vmlinux", KERNEL)
    declared = hashlib.sha256(b"the tenant's claim").hexdigest()
    _place(vms, "corrupt", worker.node, celery_client, kernel={"url": url, "sha256": declared})
    st = _failed(vms, "corrupt", "ChecksumMismatch")
    assert st["message"] == "spec.image.kernel.url: sha256 does not match"
    event = _warning(vms, "corrupt", "ChecksumMismatch")
    assert KERNEL_SHA not in event.message and KERNEL_SHA not in worker.log_text()
    assert server.hits == ["/vmlinux"]
    cache = worker.state_dir / "images"
    assert not [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else True


def test_a_fifo_given_as_a_path_image_fails_the_vm_and_leaves_the_worker_answering(
        make_worker, netns, vms, celery_client, tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    os.mkfifo(image_dir / "vmlinuz")
    (image_dir / "initrd.img").write_bytes(b"initrd")
    worker = make_worker(netns=netns, image_dir=image_dir, sync_interval_seconds=300)
    _place(vms, "piped", worker.node, celery_client, kernel={"path": "vmlinuz"})
    st = _failed(vms, "piped", "InvalidSpec")
    assert st["message"] == "spec.image.kernel.path: 'vmlinuz' is not a regular file (a FIFO)"
    _warning(vms, "piped", "InvalidSpec")
    res = worker.celery("inspect", "ping", "-d", f"mikrom@{worker.node}", "--timeout", "10")
    assert res.returncode == 0 and "pong" in res.stdout, res.stdout + res.stderr
    # and it keeps heartbeating
    beat = (vms.cluster_object(names.MICROVMNODES, worker.node) or {}).get("status", {}).get("lastHeartbeatTime")
    wait_for(lambda: (vms.cluster_object(names.MICROVMNODES, worker.node) or {}).get("status", {}).get(
        "lastHeartbeatTime") != beat, 15, "the next heartbeat")
