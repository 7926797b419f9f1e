"""The original Mikrom guide's Celery commands keep working: beat with its schedule, Flower with
its options behind basic auth, purge."""

import base64
import os
import subprocess
import sys
import urllib.error
import urllib.request


from harness import procs
from harness.waits import wait_for

CELERY = [sys.executable, "-m", "celery", "-A", "mikrom.celery_app"]


def _env(redis, **extra):
    env = dict(os.environ)
    env.update(MIKROM_BROKER_URL=redis.url(db=3), MIKROM_METRICS_ADDRESS="127.0.0.1",
               MIKROM_METRICS_PORT=str(procs.free_port()), **extra)
    return env


def test_beat_sends_the_guides_schedule(redis, tmp_path):
    env = _env(redis, MIKROM_SYNC_INTERVAL_SECONDS="1")
    beat = procs.start("celery-beat", CELERY + ["beat", "--loglevel=info", "-s", str(tmp_path / "schedule")],
                       tmp_path, env=env)
    try:
        wait_for(lambda: beat.tail(200).count("Sending due task sync-status") >= 2, 60,
                 "beat to send sync-status twice", interval=0.5, abort=lambda: None if beat.alive() else f"beat exited:\n{beat.tail()}")
        log = beat.tail(200)
        assert log.count("Sending due task sync-status (mikrom.worker.tasks.sync_vm_status)") >= 2, log
    finally:
        beat.stop()


def _get(url, auth=None):
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_flower_runs_with_the_guides_options_behind_basic_auth(redis, tmp_path):
    port = procs.free_port()
    flower = procs.start("flower", CELERY + [
        "flower", f"--port={port}", "--address=127.0.0.1", "--basic_auth=admin:password,ops:s3cret",
        "--url_prefix=flower", "--max_tasks=10000", "--persistent=True", f"--db={tmp_path / 'flower.db'}",
        f"--broker_api={redis.url(db=3)}",
    ], tmp_path, env=_env(redis))
    try:
        procs.wait_port(port, 60, flower)
        assert _get(f"http://127.0.0.1:{port}/flower/api/workers")[0] == 401
        assert _get(f"http://127.0.0.1:{port}/flower/api/workers", "admin:wrong")[0] == 401
        status, body = _get(f"http://127.0.0.1:{port}/flower/api/workers", "ops:s3cret")
        assert status == 200, body
        assert _get(f"http://127.0.0.1:{port}/flower/", "admin:password")[0] == 200
    finally:
        flower.stop()


def test_purge_without_confirmation_empties_the_default_queue(redis):
    from mikrom import broker

    r = broker.client(redis.url(db=3))
    r.delete("mikrom")
    env = _env(redis)
    send = ("from mikrom.celery_app import app\n"
            "for i in range(5): app.send_task('mikrom.worker.tasks.health_check', queue='mikrom')\n")
    subprocess.run([sys.executable, "-c", send], env=env, check=True, timeout=60)
    assert r.llen("mikrom") == 5
    res = subprocess.run(CELERY + ["purge", "-f"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "Purged 5 messages" in res.stdout, res.stdout
    assert r.llen("mikrom") == 0
