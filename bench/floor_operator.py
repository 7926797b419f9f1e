"""The floor for "MicroVM created → message on a node's queue": a kopf operator that does nothing else.

On the creation of a MicroVM it sends the reference message Mikrom's operator would send
(`create_vm_task` with a `VMRef`, on `mikrom.node.<node>`) and nothing more: no validation, no
placement (the node is the MicroVM's uid hashed over `FLOOR_NODES`), no status write, no Events, no
finalizer. Whatever Mikrom's operator takes above this figure, measured in the same run by
bench/dispatch.py, is its own work.

    FLOOR_NODES=bench-0,bench-1 MIKROM_BROKER_URL=... kopf run --quiet --standalone -n floor bench/floor_operator.py

kopf runs with its defaults otherwise (kopf >= 1.40 has no batching window, so there is no
setting that would favour one of the two); bench/dispatch.py runs it with `--quiet` (kopf's own
log at WARNING, as in Mikrom's operator).
"""

from __future__ import annotations

import hashlib
import os
import uuid

import kopf

from mikrom import names
from mikrom.celery_app import app
from mikrom.models import VMRef
from mikrom.names import Intent

NODES = [n for n in os.environ.get("FLOOR_NODES", "").split(",") if n]
RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.posting.enabled = False
    settings.scanning.disabled = True
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="floor.mikrom.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="floor.mikrom.io")


@kopf.on.create(names.GROUP, names.VERSION, names.MICROVMS)
def send_create(meta, **_) -> None:
    node = NODES[int(hashlib.sha256(meta["uid"].encode()).hexdigest(), 16) % len(NODES)]
    ref = VMRef(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], intent=Intent.CREATE)
    send(names.CREATE_VM, ref.model_dump(mode="json"), names.node_queue(node))


def send(name: str, kwargs: dict, queue: str) -> None:
    """The message as Mikrom's operator publishes it (mikrom.operator.dispatch.send): what
    `app.send_task` does less its subscription to the result, which neither operator reads."""
    amqp = app.amqp
    options = amqp.router.route({"queue": queue}, name, (), kwargs, None)
    message = amqp.create_task_message(str(uuid.uuid4()), name, (), kwargs, reply_to=app.thread_oid,
                                       ignore_result=None, create_sent_event=app.conf.task_send_sent_event, **options)
    with app.producer_or_acquire() as producer:
        amqp.send_task_message(producer, name, message, retry=True, retry_policy=RETRY_POLICY, **options)
