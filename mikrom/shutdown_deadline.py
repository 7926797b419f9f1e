"""A deadline on the worker's warm shutdown once it runs no task.

SIGTERM starts Celery's warm shutdown: the running tasks finish, then Celery closes its consumer,
sends `worker-offline` and restores unacknowledged messages, all through Redis. When Redis went
too (a `helm uninstall` removes both; a Sentinel whose pods are gone), those last steps reconnect
at length: every connect to a vanished Sentinel waits out its timeout, redis-py retries each one,
kombu retries the whole. The pod's grace period (above the task time limit, so a running task can
finish) would then end in a SIGKILL minutes later, keeping the node's worker slot and its
hostNetwork ports taken all that time.

So once the worker runs no task, what is left of its shutdown gets `worker_shutdown_idle_seconds`;
then the process exits at once (status 0). Nothing of value is cut: each task has finished, and a
message the worker had fetched but not started is redelivered by Redis (late acknowledgement).

The watch runs in a real OS thread (not a greenlet: what it guards may block the gevent hub) and
starts with the shutdown (`worker_shutting_down`), connected by mikrom.celery_app in `celery worker`.
"""

from __future__ import annotations

import os
import sys
import time

from celery import signals
from celery.worker import state

POLL_SECONDS = 0.5


def _original(module: str, name: str):
    """The unpatched `module.name` in a gevent-patched process (a real thread, a real sleep)."""
    try:
        from gevent import monkey

        return monkey.get_original(module, name)
    except ImportError:
        return getattr(__import__(module), name)


def watch(idle_seconds: float, clock=time.monotonic, sleep=None, exit=os._exit) -> None:
    """Wait until no task has run for `idle_seconds`, then end the process."""
    sleep = sleep or _original("time", "sleep")
    idle_since = None
    while True:
        if state.active_requests:
            idle_since = None
        elif idle_since is None:
            idle_since = clock()
        elif clock() - idle_since >= idle_seconds:
            # os.write, not logging: a logging lock may be held by the greenlet this cuts short
            os.write(sys.__stderr__.fileno(), (
                f"worker: shutdown still not done {idle_seconds:g} s after the last task; exiting\n").encode())
            exit(0)
            return
        sleep(POLL_SECONDS)


def install(idle_seconds: float) -> None:
    """Start `watch` in an OS thread when the worker's shutdown begins."""
    started = []

    @signals.worker_shutting_down.connect(weak=False)
    def _start(**_):
        if started:
            return
        started.append(True)
        _original("_thread", "start_new_thread")(watch, (idle_seconds,))
