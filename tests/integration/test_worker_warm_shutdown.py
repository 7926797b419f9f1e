"""A gevent worker in its warm shutdown (SIGTERM) whose Redis goes meanwhile, as in a `helm
uninstall` that removes both, still exits once its running task is done: its event heartbeats
give up reconnecting after seconds (mikrom.celery_events) instead of holding the shutdown until
the pod's grace period ends.

The worker is a real `celery worker --pool=gevent` of an app configured like mikrom.celery_app
(its settings and its events class), against a real redis-server that the test stops.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid

from celery import Celery
from harness import procs, redis_server
from harness.waits import wait_for

from mikrom import broker

APP = '''
import time
from pathlib import Path

from celery import Celery

from mikrom import celery_app
from mikrom.settings import Settings

app = Celery("warm-shutdown-test", events=celery_app.app.events_cls)
celery_app.configure(app, Settings.from_env())


@app.task(name="mikrom.test.hold")
def hold(marker, seconds):
    Path(marker + ".started").touch()
    time.sleep(seconds)  # gevent's sleep: the worker runs with --pool=gevent
    Path(marker + ".finished").touch()
    return seconds
'''
TASK_SECONDS = 8
"""Longer than Celery's 2 s heartbeat interval: heartbeats fall due while the shutdown waits."""
EXIT_BOUND = 30
"""The task's rest, a few seconds of heartbeat retries, the shutdown itself; far below a pod's
grace period (330 s in the chart)."""


def test_a_worker_whose_redis_goes_during_its_warm_shutdown_exits_after_its_task(tmp_path, artifacts_dir):
    name = "warm-" + uuid.uuid4().hex[:6]
    redis = redis_server.start(artifacts_dir / f"redis-{name}")
    worker = None
    try:
        (tmp_path / "warm_shutdown_app.py").write_text(APP)
        queue = f"mikrom.test.{name}"
        env = {**os.environ, "MIKROM_BROKER_URL": redis.url(db=3), "PYTHONPATH": str(tmp_path),
               "MIKROM_LOG_FORMAT": "text"}
        worker = procs.start(name, [sys.executable, "-m", "celery", "-A", "warm_shutdown_app", "worker",
                                    "--pool=gevent", "--concurrency=4", "--loglevel=info", "-Q", queue,
                                    "-n", f"{name}@test"],
                             artifacts_dir, env=env, cwd=str(tmp_path))
        wait_for(lambda: " ready." in worker.log.read_text(errors="replace"), 60, "the worker to be ready",
                 abort=lambda: None if worker.alive() else worker.tail())

        client = Celery("warm-shutdown-client", broker=redis.url(db=3))
        marker = tmp_path / "hold"
        client.send_task("mikrom.test.hold", (str(marker), TASK_SECONDS), queue=queue)
        started, finished = tmp_path / "hold.started", tmp_path / "hold.finished"
        wait_for(started.exists, 30, "the task to start", abort=lambda: None if worker.alive() else worker.tail())

        os.kill(worker.pid, signal.SIGTERM)
        wait_for(lambda: "Warm shutdown" in worker.log.read_text(errors="replace"), 10, "the warm shutdown")
        # Redis goes once the worker stopped consuming (its consumer stopped, heartbeats and all),
        # while the task still runs: Celery's heartbeat timer fires on regardless
        admin = broker.client(redis.url(db=3))
        wait_for(lambda: not any("b" in c.get("flags", "") for c in admin.client_list()), 20,
                 "the worker to stop consuming (no client blocked in BRPOP)")
        admin.close()
        assert not finished.exists(), f"the task must outlast the consumer's stop; raise TASK_SECONDS ({TASK_SECONDS})"
        redis.stop()
        wait_for(lambda: not worker.alive(), EXIT_BOUND, f"the worker to exit within {EXIT_BOUND} s of Redis going",
                 interval=0.5)
        assert finished.exists(), "the warm shutdown let the running task finish"
        client.close()
    finally:
        if worker is not None:
            worker.stop(timeout=5)
        redis.stop()
