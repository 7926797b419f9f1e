"""The Celery application: `celery -A mikrom.celery_app worker|beat|flower|inspect|control|purge|events`.

Configuration is written here once. The operator only sends tasks by name; the worker process loads
`mikrom.worker.tasks` (the `include` below), so importing this module never imports the worker.
"""

from __future__ import annotations

import os
import sys

from celery import Celery
from kombu import Exchange, Queue
from kombu.common import Broadcast

from . import broker, names
from .settings import Settings

SERVICES = ("worker", "beat", "flower", "events")
"""`celery` commands that run as a service: they refuse a broker without a password at start."""

settings = Settings.from_env()

# events: heartbeats retry for seconds, not forever (a warm shutdown must not outlive its Redis)
app = Celery("mikrom", include=["mikrom.worker.tasks"], events="mikrom.celery_events:Events")
celery_app = app  # the original guide's name for it


def route_task(name, args, kwargs, options, task=None, **kw):
    """Beat's status sync, orphan sweep and health check are broadcast (every node does its own);
    the rest goes to the default queue. A queue the caller names wins: Celery would otherwise merge
    it with this route's exchange and send it somewhere else. VM tasks reach a node's queue that
    way (the operator names `mikrom.node.<node>`), or from the default queue, where a worker
    forwards them to the VM's node: their body is a VMRef, which has no field naming a node."""
    if options and options.get("queue"):
        return None
    if name in (names.SYNC_VM_STATUS, names.CLEANUP_OLD_VMS, names.HEALTH_CHECK):
        # Celery never declares a Broadcast queue's exchange when sending, and kombu's Redis
        # transport takes an exchange it has not seen declared for a direct one: the message would
        # go nowhere. Redis fanout publishes on a channel named after exchange and routing key, so
        # the key is pinned here and on the Broadcast queue below.
        return {"queue": names.BROADCAST_QUEUE, "exchange": names.BROADCAST_QUEUE,
                "routing_key": names.BROADCAST_QUEUE,
                "declare": [Exchange(names.BROADCAST_QUEUE, type="fanout")]}
    return {"queue": names.DEFAULT_QUEUE, "routing_key": names.DEFAULT_QUEUE}


def celery_command(argv: list[str] | None = None) -> str | None:
    """The `celery` subcommand this process runs (`celery -A mikrom.celery_app worker ...`,
    `python -m celery ...`, or `mikrom worker`, which runs Celery's main), or None when this
    process is not the `celery` command line (the operator, a test importing the app)."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return None
    prog = argv[0]
    if os.path.basename(prog) == "flower":
        return "flower"
    if os.path.basename(prog) != "celery" and not prog.endswith(os.path.join("celery", "__main__.py")):
        return None
    commands = {"worker", "beat", "flower", "events", "inspect", "control", "purge", "call", "shell", "status",
                "result", "migrate", "multi", "report", "amqp", "graph", "list", "upgrade", "logtool"}
    return next((a for a in argv[1:] if a in commands), None)


def configure(app: Celery, settings: Settings) -> None:
    """Apply `settings` to `app` (tests call it again with their own Redis)."""
    broker_transport = {
        "visibility_timeout": max(3600, settings.task_time_limit * 2),
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
    }
    backend_transport: dict = {"retry_policy": {"timeout": settings.redis_timeout_seconds}}
    secure: dict = {}
    # kombu takes a bare rediss:// URL as "TLS without certificate checks": the options are
    # always given, from the settings (verified against MIKROM_BROKER_CA_FILE by default)
    if broker.scheme(settings.broker) == "rediss":
        secure["broker_use_ssl"] = broker.tls_options(settings)
    if broker.scheme(settings.backend) == "rediss":
        secure["redis_backend_use_ssl"] = broker.tls_options(settings)
    if broker.scheme(settings.broker) == "sentinel":
        broker_transport["master_name"] = settings.broker_sentinel_master
    if broker.scheme(settings.backend) == "sentinel":
        backend_transport["master_name"] = settings.broker_sentinel_master
    app.conf.update(
        **secure,
        broker_url=settings.broker,
        result_backend=settings.backend,
        # JSON only: a forged pickle in Redis must not run code
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # a task is acknowledged after it ran; a worker killed mid-task gets it redelivered
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_soft_time_limit,
        result_expires=settings.result_expires_seconds,
        result_extended=True,
        # Redis redelivers unacknowledged messages after visibility_timeout; it must outlast the
        # hard time limit
        broker_transport_options=broker_transport,
        result_backend_transport_options=backend_transport,
        redis_socket_timeout=settings.redis_timeout_seconds,
        redis_socket_connect_timeout=settings.redis_timeout_seconds,
        redis_retry_on_timeout=True,
        broker_connection_timeout=settings.redis_timeout_seconds,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=0,
        task_default_queue=names.DEFAULT_QUEUE,
        task_default_exchange=names.DEFAULT_QUEUE,
        task_default_routing_key=names.DEFAULT_QUEUE,
        task_queues=(
            Queue(names.DEFAULT_QUEUE, Exchange(names.DEFAULT_QUEUE, type="direct"), routing_key=names.DEFAULT_QUEUE),
            Broadcast(names.BROADCAST_QUEUE, routing_key=names.BROADCAST_QUEUE),
        ),
        task_create_missing_queues=True,
        task_routes=(route_task,),
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        mikrom_log_format=settings.log_format,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=beat_schedule(settings),
    )


def beat_schedule(settings: Settings) -> dict:
    """The original guide's schedule; status sync every 30 s by default (DESIGN.md section 6)."""
    from celery.schedules import crontab

    return {
        "cleanup-old-vms": {"task": names.CLEANUP_OLD_VMS, "schedule": crontab(hour=2, minute=0)},
        "health-check": {"task": names.HEALTH_CHECK, "schedule": crontab(minute=0)},
        "sync-status": {"task": names.SYNC_VM_STATUS, "schedule": settings.sync_interval_seconds},
        "weekly-report": {"task": names.GENERATE_REPORT, "schedule": crontab(hour=9, minute=0, day_of_week="1-5")},
    }


if celery_command() in SERVICES:  # worker, beat, flower: no start with a broker open to anyone
    broker.refuse_to_start(settings, celery_command())

configure(app, settings)

if celery_command() == "worker":  # a warm shutdown whose Redis went must still end (mikrom.shutdown_deadline)
    from . import broker_compat, shutdown_deadline

    broker_compat.install()  # a Redis restart with messages in flight must not end the worker

    shutdown_deadline.install(settings.worker_shutdown_idle_seconds)

if celery_command() == "flower":  # `celery -A mikrom.celery_app flower ...`: the guide's options
    from . import flower_compat

    flower_compat.install()
