"""The original guide's Celery commands against a running stack: a real `mikrom worker` (gevent pool)
on the real Redis and API server. test_celery_guide.py covers beat's schedule, Flower's options and
`purge -f` of the default queue; this file covers the rest of the guide: inspect, purge with
confirmation, control (pool_grow, pool_shrink, shutdown), events, apply_async's options, the
guide's positional arguments, and `python -m mikrom.worker|beat` for run_worker.py and run_beat.py."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import netns as netns_mod
from harness import procs, worker_proc
from harness.microvms import MicroVMClient
from harness.waits import holds_for, wait_for

from mikrom import names

REPO = Path(__file__).resolve().parents[2]
CELERY = [sys.executable, "-m", "celery", "-A", "mikrom.celery_app"]
BEAT_TASKS = {names.SYNC_VM_STATUS, names.CLEANUP_OLD_VMS, names.HEALTH_CHECK, names.GENERATE_REPORT}
PURGE_DB = 7
"""A Redis database no worker consumes (purge counts what is left in it)."""


class Halted(MicroVMClient):
    """MicroVMs that never boot (runStrategy Halted): a task for one does its bookkeeping only."""

    def manifest(self, name: str, **spec) -> dict:
        return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "namespace": self.ns},
                "spec": {"vcpus": 1, "memoryMiB": 128, "runStrategy": "Halted",
                         "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}, **spec}}


@pytest.fixture(scope="module")
def node_worker(control_plane, kube_api, redis, worker_kubeconfig, artifacts_dir):
    """One real worker for the module's read-mostly checks (a worker start is the slow part)."""
    ns = netns_mod.create()
    state = Path(tempfile.mkdtemp(prefix="mkw-gp-", dir="/tmp"))
    node = worker_proc.new_node_name("guide")
    env = worker_proc.worker_env(kubeconfig=worker_kubeconfig, broker_url=redis.url(db=worker_proc.BROKER_DB),
                                 node=node, state_dir=state, image_dir=state / "no-images", netns=ns,
                                 heartbeat_seconds=2, sync_interval_seconds=300)
    w = worker_proc.WorkerProc(node=node, env=env, logdir=artifacts_dir / "worker", state_dir=state)
    try:
        yield w.start()
    finally:
        w.cleanup()
        # a node without a worker must not be offered to later tests' VMs
        MicroVMClient(kube_api, "").delete_cluster_object(names.MICROVMNODES, node)
        netns_mod.delete(ns)
        shutil.rmtree(state, ignore_errors=True)


def _dest(w) -> list[str]:
    return ["-d", f"mikrom@{w.node}", "--timeout", "10", "--json"]


def _inspect(w, what: str, *args: str) -> dict:
    res = w.celery("inspect", what, *args, *_dest(w))
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)[f"mikrom@{w.node}"]


def _ref(namespace: str, name: str, uid: str = "00000000-0000-0000-0000-000000000000") -> dict:
    return {"namespace": namespace, "name": name, "uid": uid, "intent": "create"}


# ------------------------------------------------------------------------------------ inspect
@contextlib.contextmanager
def _create_held_at_its_lock(w, kube_api, namespace: str, celery_client, name: str):
    """The create of a Halted VM placed on `w`'s node, sent while this holds the VM's node lock as
    another operation on it would: the task waits for the lock, in flight, until the block ends."""
    vms = Halted(kube_api, namespace)
    uid = vms.create(name)["metadata"]["uid"]
    vms.patch_status(name, {"node": w.node, "phase": "Scheduled"})
    lock_dir = w.state_dir / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{uid}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield celery_client.send_task(names.CREATE_VM, kwargs=_ref(namespace, name, uid),
                                      queue=names.node_queue(w.node))
        fcntl.flock(held, fcntl.LOCK_UN)


def test_inspect_registered_lists_the_five_vm_tasks_and_the_four_beat_tasks(node_worker):
    registered = {line.split()[0] for line in _inspect(node_worker, "registered")}
    assert set(names.VM_TASKS) <= registered, registered
    assert BEAT_TASKS <= registered, registered


def test_inspect_active_queues_shows_the_node_default_and_broadcast_queues(node_worker):
    queues = _inspect(node_worker, "active_queues")
    assert {names.node_queue(node_worker.node), names.DEFAULT_QUEUE} <= {q["name"] for q in queues}
    # the broadcast queue is each worker's own (bcast.<id>), bound to the fanout exchange
    fanout = [q for q in queues if q["exchange"]["name"] == names.BROADCAST_QUEUE]
    assert fanout and fanout[0]["exchange"]["type"] == "fanout", queues


def test_pool_grow_and_pool_shrink_change_the_gevent_pool_size(node_worker):
    def size() -> int:
        return _inspect(node_worker, "stats")["pool"]["max-concurrency"]

    before = size()
    stats = _inspect(node_worker, "stats")
    assert stats["pool"]["implementation"] == "celery.concurrency.gevent:TaskPool", stats["pool"]
    grow = node_worker.celery("control", "pool_grow", "10", *_dest(node_worker))
    assert grow.returncode == 0 and "pool will grow" in grow.stdout, grow.stdout + grow.stderr
    assert size() == before + 10
    shrink = node_worker.celery("control", "pool_shrink", "5", *_dest(node_worker))
    assert shrink.returncode == 0 and "pool will shrink" in shrink.stdout, shrink.stdout + shrink.stderr
    assert size() == before + 5
    node_worker.celery("control", "pool_shrink", "5", *_dest(node_worker))
    assert size() == before


def test_pool_restart_is_refused_because_gevent_has_no_pool_to_restart(node_worker):
    res = node_worker.celery("control", "pool_restart", *_dest(node_worker))
    assert "Pool restarts not enabled" in res.stdout + res.stderr, res.stdout + res.stderr
    assert _inspect(node_worker, "ping") == {"ok": "pong"}  # and the worker carries on


# ------------------------------------------------------------------------------------ apply_async
def test_countdown_holds_the_task_as_scheduled_until_it_is_due(node_worker, celery_client, namespace):
    queue = names.node_queue(node_worker.node)
    sent = time.monotonic()
    result = celery_client.send_task(names.CREATE_VM, kwargs=_ref(namespace, "later"), queue=queue, countdown=6)
    scheduled = wait_for(lambda: [s for s in _inspect(node_worker, "scheduled") if s["request"]["id"] == result.id],
                         20, "the worker to hold the task as scheduled")
    assert scheduled[0]["eta"], scheduled
    assert not result.ready()
    assert result.get(timeout=60)["outcome"].startswith("dropped")  # there is no such VM: nothing done
    assert time.monotonic() - sent >= 6


def test_eta_runs_the_task_at_that_time(node_worker, celery_client, namespace):
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=5)
    result = celery_client.send_task(names.CREATE_VM, kwargs=_ref(namespace, "at"), queue=names.node_queue(node_worker.node),
                                     eta=eta)
    assert result.get(timeout=60)["outcome"].startswith("dropped")
    done = result.date_done if result.date_done.tzinfo else result.date_done.replace(tzinfo=dt.timezone.utc)
    assert done >= eta, (done, eta)


def test_retry_policy_delivers_on_a_reachable_broker(node_worker, celery_client, namespace):
    result = celery_client.send_task(names.CREATE_VM, kwargs=_ref(namespace, "retried"), queue=names.node_queue(node_worker.node),
                                     retry=True, retry_policy={"max_retries": 3, "interval_start": 0,
                                                               "interval_step": 0.2, "interval_max": 0.2})
    assert result.get(timeout=60)["outcome"].startswith("dropped")


def test_a_vm_tasks_status_reads_started_while_it_runs_and_success_once_done_never_started_after(
        node_worker, kube_api, namespace, celery_client):
    # the guide's `result.status`: PENDING, STARTED, SUCCESS (a VM task stores STARTED itself)
    with _create_held_at_its_lock(node_worker, kube_api, namespace, celery_client, "tracked") as result:
        wait_for(lambda: result.state == "STARTED", 30, "the task to read STARTED")
        assert result.info["hostname"] == f"mikrom@{node_worker.node}" and result.info["pid"] > 0, result.info
    assert result.get(timeout=60)["outcome"] == "stopped"
    holds_for(lambda: _stored_state(celery_client, result.id) == "SUCCESS", 1, "the stored state to stay SUCCESS")


def test_the_worker_stores_every_tasks_state_through_one_result_backend_not_a_connection_per_task(
        node_worker, celery_client, namespace, redis):
    import redis as redis_py

    server = redis_py.Redis.from_url(redis.url(), socket_timeout=10)

    def run(name: str) -> None:
        result = celery_client.send_task(names.CREATE_VM, kwargs=_ref(namespace, name),
                                         queue=names.node_queue(node_worker.node))
        assert result.get(timeout=60)["outcome"].startswith("dropped")

    run("warm")  # what the worker connects once (its result backend among them)
    before = server.info("stats")["total_connections_received"]
    for i in range(10):
        run(f"one-{i}")
    # the test's own client may connect once or twice; a backend per task would be ten or more
    assert server.info("stats")["total_connections_received"] - before <= 3
    server.close()


def _stored_state(app, task_id: str) -> str | None:
    """The state in the result backend itself (AsyncResult caches a finished one)."""
    raw = app.backend.get(app.backend.get_key_for_task(task_id))
    return json.loads(raw)["status"] if raw else None


def test_retry_policy_gives_up_after_max_retries_on_an_unreachable_broker():
    from kombu.exceptions import OperationalError

    app = worker_proc.client_app(f"redis://:x@127.0.0.1:{procs.free_port()}/0")
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError):
            # ignore_result: no result-store subscription first, so the failure is the broker's
            app.send_task(names.CREATE_VM, kwargs=_ref("default", "x"), queue=names.DEFAULT_QUEUE, retry=True,
                          ignore_result=True,
                          retry_policy={"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2})
        assert time.monotonic() - started >= 0.4  # it waited between its retries
    finally:
        app.close()


def test_the_guides_positional_arguments_are_refused_saying_what_to_send(node_worker, celery_client):
    queue = names.node_queue(node_worker.node)
    out = celery_client.send_task(names.CREATE_VM, args=[1, 2, 2048, None, None], queue=queue).get(timeout=60)
    assert out["outcome"] == "rejected"
    assert "keyword arguments only" in out["error"] and "namespace, name, uid" in out["error"], out
    old = celery_client.send_task(names.CREATE_VM, kwargs={"vm_db_id": 1, "vcpu_count": 2, "memory_mb": 2048,
                                                          "kernel_path": None, "host": None}, queue=queue).get(timeout=60)
    assert old["outcome"] == "rejected"
    assert "namespace\n  Field required" in old["error"] and "uid\n  Field required" in old["error"], old


def test_priority_on_redis_serves_the_lowest_number_first(make_worker, netns, celery_client):
    # Redis keeps one list per priority step (0, 3, 6, 9) and reads them in that order: 0 is served
    # first, the opposite of the guide's "9 = highest" (which is RabbitMQ's order).
    w = make_worker(netns=netns, start=False, sync_interval_seconds=300)
    w.extra_args = ["--concurrency", "1"]
    queue = names.node_queue(w.node)
    low = [celery_client.send_task(names.HEALTH_CHECK, queue=queue, priority=9) for _ in range(3)]
    urgent = celery_client.send_task(names.HEALTH_CHECK, queue=queue, priority=0)
    w.start()
    for r in [*low, urgent]:
        r.get(timeout=60)
    assert urgent.date_done <= min(r.date_done for r in low), (urgent.date_done, [r.date_done for r in low])


# ------------------------------------------------------------------------------------ events
def test_events_dump_shows_the_tasks_events(node_worker, celery_client, tmp_path):
    # unbuffered: `events --dump` writes to a file here, and a block-buffered stdout would hold its
    # lines back until some kilobytes have gathered
    dump = procs.start("celery-events-dump", CELERY + ["events", "--dump"], tmp_path,
                       env=dict(node_worker.env, PYTHONUNBUFFERED="1"))
    try:
        queue = names.node_queue(node_worker.node)

        sent: list[str] = []

        def seen() -> bool:
            # the events of a task reach the dump a moment after its result: look for any task sent
            # so far, not only the one just sent
            r = celery_client.send_task(names.HEALTH_CHECK, queue=queue)
            r.get(timeout=30)
            sent.append(r.id)
            log = dump.tail(400)
            return any(f"task received: {names.HEALTH_CHECK}({i})" in log and
                       f"task succeeded: {names.HEALTH_CHECK}({i})" in log for i in sent)

        wait_for(seen, 60, "events --dump to show a task's events", interval=1,
                 abort=lambda: None if dump.alive() else f"events exited:\n{dump.tail()}")
    finally:
        dump.stop()


# ------------------------------------------------------------------------------------ purge
def _fill(redis, count: int) -> None:
    env = dict(os.environ, MIKROM_BROKER_URL=redis.url(db=PURGE_DB))
    send = ("from mikrom.celery_app import app\n"
            f"for i in range({count}): app.send_task('mikrom.worker.tasks.generate_report', queue='mikrom')\n")
    subprocess.run([sys.executable, "-c", send], env=env, check=True, timeout=60)


def test_purge_asks_for_confirmation_and_keeps_the_queue_unless_told_yes(redis):
    from mikrom import broker

    r = broker.client(redis.url(db=PURGE_DB))
    r.delete(names.DEFAULT_QUEUE)
    _fill(redis, 3)
    env = dict(os.environ, MIKROM_BROKER_URL=redis.url(db=PURGE_DB))
    no = subprocess.run(CELERY + ["purge"], env=env, input="n\n", capture_output=True, text=True, timeout=60)
    assert "Are you sure you want to delete all tasks? [y/N]" in no.stdout, no.stdout + no.stderr
    assert no.returncode != 0 and "Aborted" in no.stderr
    assert r.llen(names.DEFAULT_QUEUE) == 3
    yes = subprocess.run(CELERY + ["purge"], env=env, input="y\n", capture_output=True, text=True, timeout=60)
    assert yes.returncode == 0, yes.stderr
    assert "Purged 3 messages" in yes.stdout, yes.stdout
    assert r.llen(names.DEFAULT_QUEUE) == 0


def test_purge_of_a_named_node_queue_empties_it(redis):
    from mikrom import broker

    queue = names.node_queue("purged-node")
    r = broker.client(redis.url(db=PURGE_DB))
    env = dict(os.environ, MIKROM_BROKER_URL=redis.url(db=PURGE_DB))
    subprocess.run([sys.executable, "-c", "from mikrom.celery_app import app\n"
                    f"for i in range(4): app.send_task('mikrom.worker.tasks.generate_report', queue={queue!r})\n"],
                   env=env, check=True, timeout=60)
    assert r.llen(queue) == 4
    res = subprocess.run(CELERY + ["purge", "-f", "-Q", queue], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "Purged 4 messages" in res.stdout, res.stdout + res.stderr
    assert r.llen(queue) == 0


# ------------------------------------------------------------------------------------ shutdown
def test_control_shutdown_finishes_the_task_in_flight_before_exiting(make_worker, netns, kube_api, namespace,
                                                                      celery_client):
    w = make_worker(netns=netns, sync_interval_seconds=300)
    with _create_held_at_its_lock(w, kube_api, namespace, celery_client, "busy") as result:
        wait_for(lambda: any(t["id"] == result.id for t in _inspect(w, "active")), 30, "the task to be active")
        # a worker never replies to shutdown (it is on its way out): the command says "No nodes
        # replied" and exits 69 whatever happens; the worker's log tells
        w.celery("control", "shutdown", *_dest(w))
        w.wait_log("Got shutdown from remote", 30)
        holds_for(lambda: w.proc.alive() and not result.ready(), 2, "the worker to wait for its task")
    assert result.get(timeout=60)["outcome"] == "stopped"
    wait_for(lambda: not w.proc.alive(), 60, "the worker to exit")
    assert w.proc.popen.returncode == 0, w.proc.tail()


# ------------------------------------------------------------------------------------ run_*.py
def test_python_m_mikrom_worker_starts_the_node_worker(make_worker, netns, celery_client):
    w = make_worker(netns=netns, start=False, sync_interval_seconds=300)
    w.proc = procs.start(f"worker-{w.node}-m", [sys.executable, "-m", "mikrom.worker", "--node", w.node,
                                                "--concurrency", "7"], w.logdir, env=w.env, cwd=str(REPO))
    w.wait_log("ready.", 90)
    w.wait_log(f"registered MicroVMNode {w.node}", 60)
    assert _inspect(w, "stats")["pool"]["max-concurrency"] == 7
    assert celery_client.send_task(names.HEALTH_CHECK, queue=names.node_queue(w.node)).get(timeout=30)["problems"] == []


def test_python_m_mikrom_beat_sends_the_schedule(redis, tmp_path):
    env = dict(os.environ, MIKROM_BROKER_URL=redis.url(db=PURGE_DB), MIKROM_SYNC_INTERVAL_SECONDS="1")
    beat = procs.start("mikrom-beat", [sys.executable, "-m", "mikrom.beat", "-s", str(tmp_path / "schedule")],
                       tmp_path, env=env)
    try:
        wait_for(lambda: beat.tail(200).count("Sending due task sync-status") >= 2, 60, "beat to send sync-status",
                 interval=0.5, abort=lambda: None if beat.alive() else f"beat exited:\n{beat.tail()}")
    finally:
        beat.stop()
    assert (tmp_path / "schedule").exists() or list(tmp_path.glob("schedule*"))
