"""Celery's event dispatcher with a bound on the retries of the events that ask for them.

Celery sends the worker's `worker-heartbeat` events (every 2 s, for Flower and `celery events`)
with `retry=True` and no retry policy, which kombu takes as "reconnect forever", while holding
the dispatcher's lock. A worker in its warm shutdown (SIGTERM: the tasks it runs finish first)
whose Redis goes meanwhile, as in a `helm uninstall` that removes both, then never gets past that
loop: the shutdown's own `worker-offline` waits on the lock until the pod's grace period ends and
kubelet kills it. A heartbeat is worth a few seconds of retries, never more: the next one follows
two seconds later, and what could not be sent is buffered as Celery buffers any event it cannot
send. Events that name a retry policy of their own keep it.

Passed to `Celery(events=...)` in mikrom.celery_app, Celery's place for an events class.
"""

from __future__ import annotations

from celery.app.events import Events as CeleryEvents
from celery.events.dispatcher import EventDispatcher as CeleryEventDispatcher

EVENT_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 1}
"""kombu `Connection.ensure` options for an event sent with `retry=True` and no policy: about
three seconds of reconnecting (each connect bounded by the broker's connect timeout)."""


class EventDispatcher(CeleryEventDispatcher):
    """Celery's dispatcher; `retry=True` without a policy means EVENT_RETRY_POLICY, not forever."""

    def send(self, type, *args, retry=False, retry_policy=None, **fields):
        if retry and retry_policy is None:
            retry_policy = dict(EVENT_RETRY_POLICY)
        return super().send(type, *args, retry=retry, retry_policy=retry_policy, **fields)


class Events(CeleryEvents):
    """`app.events` with the dispatcher above."""

    dispatcher_cls = f"{__name__}:EventDispatcher"
