"""A `rediss://` broker: a real redis-server speaking only TLS on loopback, with a CA and a
server certificate made here with openssl. The worker, its tasks' results and its health check go
through it, verified against MIKROM_BROKER_CA_FILE; a client that does not trust that CA is
refused, since kombu's own default for a bare rediss:// URL would be not to check at all."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
from celery import Celery
from harness import procs
from harness.microvms import MicroVMClient

from mikrom import broker, names
from mikrom.celery_app import configure
from mikrom.settings import Settings


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(d: Path) -> dict:
    """A CA and a server certificate for 127.0.0.1 signed by it; and a second CA nobody uses."""
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                "-days", "2", "-subj", f"/CN=mikrom test {ca}", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.ext", cwd=d)
    return {name: str(d / f"{name}.crt") for name in ("ca", "other-ca", "server")} | {"key": str(d / "server.key")}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """redis-server with TLS only (no plain port), a password, and no client certificates asked."""
    d = tmp_path_factory.mktemp("tls-redis")
    certs = make_certs(d / "certs")
    port, password = procs.free_port(), secrets.token_hex(16)
    conf = d / "redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport 0\ntls-port {port}\ntls-cert-file {certs['server']}\n"
                    f"tls-key-file {certs['key']}\ntls-ca-cert-file {certs['ca']}\ntls-auth-clients no\n"
                    f"requirepass {password}\nsave \"\"\nappendonly no\ndir {d}\nprotected-mode yes\n")
    proc = procs.start(f"redis-tls-{port}", [shutil.which("redis-server"), str(conf)], d)
    procs.STARTED.append(proc)
    try:
        procs.wait_port(port, 30, proc)
        yield {"url": f"rediss://:{password}@127.0.0.1:{port}", "password": password, "port": port, **certs}
    finally:
        proc.stop()
        procs.STARTED.remove(proc)


def test_the_health_check_of_a_rediss_broker_verifies_the_servers_certificate(tls_redis):
    url = tls_redis["url"] + "/0"
    broker.check(url, timeout=5, settings=Settings(broker_url=url, broker_ca_file=tls_redis["ca"]))
    with pytest.raises(broker.BrokerUnavailable) as err:
        broker.check(url, timeout=5, settings=Settings(broker_url=url, broker_ca_file=tls_redis["other-ca"]))
    assert "certificate verify failed" in str(err.value)
    assert tls_redis["password"] not in str(err.value)


def test_a_celery_client_that_does_not_trust_the_brokers_ca_is_refused(tls_redis):
    import redis
    from kombu.exceptions import OperationalError

    app = Celery("untrusting")
    configure(app, Settings(broker_url=tls_redis["url"] + "/7", broker_ca_file=tls_redis["other-ca"],
                            redis_timeout_seconds=3))
    try:
        with app.connection_for_write() as conn, pytest.raises((OperationalError, redis.ConnectionError)) as err:
            conn.ensure_connection(max_retries=1, timeout=10)
        assert "certificate verify failed" in str(err.value)
        assert tls_redis["password"] not in str(err.value)
    finally:
        app.close()
    trusting = Celery("trusting")  # the same settings with the right CA connect
    configure(trusting, Settings(broker_url=tls_redis["url"] + "/7", broker_ca_file=tls_redis["ca"]))
    try:
        with trusting.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=10)
    finally:
        trusting.close()


class Halted(MicroVMClient):
    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}


def test_a_worker_on_a_rediss_broker_runs_tasks_and_stores_results_over_tls(tls_redis, make_worker, netns, kube_api,
                                                                          namespace):
    url = tls_redis["url"] + "/6"
    worker = make_worker(netns=netns, sync_interval_seconds=300, broker_ca_file=tls_redis["ca"], start=False)
    worker.env["MIKROM_BROKER_URL"] = url
    worker.start()
    app = Celery("tls-client")
    configure(app, Settings(broker_url=url, broker_ca_file=tls_redis["ca"]))
    try:
        vms = Halted(kube_api, namespace)
        vm = vms.create("quiet")
        vms.patch_status("quiet", {"node": worker.node, "phase": "Scheduled"})
        ref = {"namespace": namespace, "name": "quiet", "uid": vm["metadata"]["uid"], "intent": "create"}
        out = app.send_task(names.CREATE_VM, kwargs=ref, queue=names.node_queue(worker.node)).get(timeout=30)
        assert out["outcome"] == "stopped"
        health = app.send_task(names.HEALTH_CHECK, queue=names.node_queue(worker.node)).get(timeout=30)
        assert health["problems"] == [] and names.node_queue(worker.node) in health["queueDepth"], health
    finally:
        app.close()
    log = worker.log_text()
    assert f"rediss://:**@127.0.0.1:{tls_redis['port']}/6" in log  # the banner, masked
    assert tls_redis["password"] not in log
