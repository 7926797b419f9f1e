"""The broker's password: every entry point refuses a Redis URL without one (unless explicitly
allowed), and a real worker's log, Celery's banner and configuration dump, and the Events and
status it writes never hold it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import procs
from harness.microvms import MicroVMClient
from harness.procs import wait_for

from mikrom import names

REPO = Path(__file__).resolve().parents[2]
CELERY = [sys.executable, "-m", "celery", "-A", "mikrom.celery_app"]
ENTRY_POINTS = {
    "mikrom operator": [sys.executable, "-m", "mikrom.cli", "operator", "--standalone"],
    "mikrom worker": [sys.executable, "-m", "mikrom.cli", "worker", "--node", "refused"],
    "celery worker": CELERY + ["worker", "--pool=gevent", "--loglevel=info"],
    "celery beat": CELERY + ["beat", "--loglevel=info"],
    "celery flower": CELERY + ["flower", "--address=127.0.0.1", "--port=0"],
}


def clean_env(tmp_path: Path, **mikrom) -> dict:
    """The caller's environment without any MIKROM_ setting, plus `mikrom`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIKROM_")}
    env.update({"PYTHONUNBUFFERED": "1", "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
                "MIKROM_METRICS_PORT": "0", "MIKROM_STATE_DIR": str(tmp_path / "state")})
    env.update({f"MIKROM_{k.upper()}": str(v) for k, v in mikrom.items()})
    return env


def run(argv: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_every_entry_point_refuses_a_broker_without_a_password_and_never_prints_the_others(redis, tmp_path, entry):
    env = clean_env(tmp_path, broker_url=f"redis://127.0.0.1:{redis.port}/3", result_backend=redis.url(db=4))
    res = run(ENTRY_POINTS[entry], env, tmp_path)
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    component = entry.split()[-1]
    assert f"mikrom {component}: refusing to start: MIKROM_BROKER_URL (redis://127.0.0.1:{redis.port}/3) has no " \
           "password" in res.stderr, res.stderr
    assert "MIKROM_BROKER_ALLOW_NO_PASSWORD=true" in res.stderr
    assert redis.password not in res.stderr + res.stdout  # the result backend's, which it did carry


@pytest.mark.parametrize("entry", ["mikrom worker", "celery beat"])
def test_a_result_backend_without_a_password_is_refused_too(redis, tmp_path, entry):
    env = clean_env(tmp_path, broker_url=redis.url(db=3), result_backend=f"redis://127.0.0.1:{redis.port}/4")
    res = run(ENTRY_POINTS[entry], env, tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert f"MIKROM_RESULT_BACKEND (redis://127.0.0.1:{redis.port}/4) has no password" in res.stderr
    assert redis.password not in res.stderr + res.stdout


@pytest.fixture
def open_redis(tmp_path):
    """A redis-server without a password on loopback (what MIKROM_BROKER_ALLOW_NO_PASSWORD is for)."""
    import shutil

    port = procs.free_port()
    conf = tmp_path / "open-redis.conf"
    conf.write_text(f"bind 127.0.0.1\nport {port}\nsave \"\"\nappendonly no\ndir {tmp_path}\nprotected-mode yes\n")
    proc = procs.start(f"open-redis-{port}", [shutil.which("redis-server"), str(conf)], tmp_path)
    procs.STARTED.append(proc)
    try:
        procs.wait_port(port, 30, proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
        procs.STARTED.remove(proc)


def test_the_explicit_insecure_setting_lets_beat_run_on_a_redis_without_a_password(open_redis, tmp_path):
    env = clean_env(tmp_path, broker_url=open_redis, broker_allow_no_password="true", sync_interval_seconds=1)
    beat = procs.start("beat-no-password", CELERY + ["beat", "--loglevel=info", "-s", str(tmp_path / "schedule")],
                       tmp_path, env=env, cwd=str(tmp_path))
    try:
        wait_for(lambda: "Sending due task sync-status" in beat.tail(200), 60, "beat to send a due task",
                 abort=lambda: None if beat.alive() else f"beat exited:\n{beat.tail()}")
    finally:
        beat.stop()


class Halted(MicroVMClient):
    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}


def test_a_real_workers_log_banner_config_events_and_status_never_hold_the_password(
        make_worker, netns, redis, kube_api, namespace, celery_client):
    worker = make_worker(netns=netns, sync_interval_seconds=300)
    vms = Halted(kube_api, namespace)
    vm = vms.create("quiet")
    vms.patch_status("quiet", {"node": worker.node, "phase": "Scheduled"})
    ref = {"namespace": namespace, "name": "quiet", "uid": vm["metadata"]["uid"], "intent": "create"}
    queue = names.node_queue(worker.node)
    assert celery_client.send_task(names.CREATE_VM, kwargs=ref, queue=queue).get(timeout=30)["outcome"] == "stopped"
    forged = {**ref, "name": "nope"}
    assert celery_client.send_task(names.DELETE_VM, kwargs=forged, queue=queue).get(timeout=30)["outcome"].startswith(
        "dropped")
    health = celery_client.send_task(names.HEALTH_CHECK, queue=queue).get(timeout=30)
    assert health["problems"] == [], health
    conf = worker.celery("inspect", "conf", "-d", f"mikrom@{worker.node}", "--timeout", "10")
    assert conf.returncode == 0 and "broker_url" in conf.stdout, conf.stderr
    report = worker.celery("report")
    worker.wait_log("dropped: no MicroVM", 10)

    log = worker.log_text()
    # Celery's banner shows the broker with the password masked
    assert f"transport:   redis://:**@127.0.0.1:{redis.port}/6" in log, log[:3000]
    for text, what in ((log, "the worker's log"), (conf.stdout, "celery inspect conf"),
                       (report.stdout + report.stderr, "celery report"), (repr(health), "health_check's result")):
        assert redis.password not in text, f"the password is in {what}"
    events = vms.core.list_namespaced_event(namespace, _request_timeout=(5, 30)).items
    assert events and all(redis.password not in f"{e.reason} {e.message}" for e in events)
    assert redis.password not in repr(vms.get("quiet"))


def test_a_worker_that_cannot_reach_its_broker_logs_where_without_the_password(make_worker, netns, redis):
    worker = make_worker(netns=netns, start=False)
    dead = procs.free_port()
    worker.env["MIKROM_BROKER_URL"] = f"redis://:{redis.password}@127.0.0.1:{dead}/6"
    argv = [sys.executable, "-m", "mikrom.cli", "worker", "--node", worker.node, "--loglevel", "info"]
    worker.proc = procs.start(f"worker-{worker.node}-unreachable", argv, worker.logdir, env=worker.env, cwd=str(REPO))
    wait_for(lambda: "Cannot connect to" in worker.log_text(), 60, "the worker to report the unreachable broker",
             abort=lambda: None if worker.proc.alive() else f"the worker exited:\n{worker.proc.tail()}")
    log = worker.log_text()
    assert f"127.0.0.1:{dead}" in log
    assert redis.password not in log
