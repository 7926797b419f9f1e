"""A `sentinel://` broker: a real Redis master with a password and a real Redis Sentinel
monitoring it, on loopback. The worker finds the master through the sentinel (master name from
MIKROM_BROKER_SENTINEL_MASTER), runs tasks and stores results there, and its health check reaches
it the same way."""

from __future__ import annotations

import shutil

import pytest
from celery import Celery
from harness import procs, redis_server
from harness.microvms import MicroVMClient

from mikrom import broker, names
from mikrom.celery_app import configure
from mikrom.settings import Settings

MASTER = "mikrom-test"


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentinel")
    master = redis_server.start(d / "master")
    procs.STARTED.append(master.proc)
    port = procs.free_port()
    conf = d / "sentinel.conf"  # Sentinel rewrites its own configuration file
    conf.write_text(f"bind 127.0.0.1\nport {port}\ndir {d}\nprotected-mode yes\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {master.port} 1\n"
                    f"sentinel auth-pass {MASTER} {master.password}\n"
                    f"sentinel down-after-milliseconds {MASTER} 5000\n")
    proc = procs.start(f"redis-sentinel-{port}", [shutil.which("redis-server"), str(conf), "--sentinel"], d)
    procs.STARTED.append(proc)
    try:
        procs.wait_port(port, 30, proc)
        yield {"url": f"sentinel://:{master.password}@127.0.0.1:{port}", "password": master.password,
               "master": master}
    finally:
        for p in (proc, master.proc):
            p.stop()
            procs.STARTED.remove(p)


def test_the_health_check_finds_the_master_through_the_sentinel(sentinel):
    url = sentinel["url"] + "/0"
    settings = Settings(broker_url=url, broker_sentinel_master=MASTER)
    broker.require_password(settings)
    broker.check(url, timeout=5, settings=settings)
    with pytest.raises(broker.BrokerUnavailable) as err:
        broker.check(url, timeout=5, settings=Settings(broker_url=url, broker_sentinel_master="no-such-master"))
    assert sentinel["password"] not in str(err.value)


class Halted(MicroVMClient):
    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}


def test_a_worker_on_a_sentinel_broker_runs_tasks_and_stores_results_on_the_master(sentinel, make_worker, netns,
                                                                                 kube_api, namespace):
    url = sentinel["url"] + "/6"
    worker = make_worker(netns=netns, sync_interval_seconds=300, broker_sentinel_master=MASTER, start=False)
    worker.env["MIKROM_BROKER_URL"] = url
    worker.start()
    app = Celery("sentinel-client")
    configure(app, Settings(broker_url=url, broker_sentinel_master=MASTER))
    try:
        vms = Halted(kube_api, namespace)
        vm = vms.create("quiet")
        vms.patch_status("quiet", {"node": worker.node, "phase": "Scheduled"})
        ref = {"namespace": namespace, "name": "quiet", "uid": vm["metadata"]["uid"], "intent": "create"}
        result = app.send_task(names.CREATE_VM, kwargs=ref, queue=names.node_queue(worker.node))
        assert result.get(timeout=30)["outcome"] == "stopped"
        health = app.send_task(names.HEALTH_CHECK, queue=names.node_queue(worker.node)).get(timeout=30)
        assert health["problems"] == [], health
    finally:
        app.close()
    # the result really is on the master the sentinel named
    assert broker.client(sentinel["master"].url(db=6)).exists(f"celery-task-meta-{result.id}") == 1
    assert sentinel["password"] not in worker.log_text()
