"""Prometheus metrics of the operator and the worker (prometheus_client, already a dependency of
Flower), served over HTTP on `MIKROM_METRICS_ADDRESS:MIKROM_METRICS_PORT` (`/metrics`).

Each process registers only what it measures: the counters and histograms below are created on
first use of the module, and the gauges that read live state are collectors the operator and the
worker install (`register_collector`).
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

from .settings import Settings

log = logging.getLogger(__name__)

# worker
TASKS = Counter("mikrom_worker_tasks_total", "Celery tasks this worker finished, by task name and final state",
                ["task", "state"])
BOOT_SECONDS = Histogram("mikrom_vm_boot_seconds", "From the VMM's start to the guest's ready signal",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 21, 34, 60))
PHASES = Counter("mikrom_worker_vm_phase_changes_total", "MicroVM phases this worker reported, by phase",
                 ["phase"])
FLEET_VMS = Gauge("mikrom_fleet_vms", "MicroVMs in the cluster by phase, as of the last generate_report",
                  ["phase"])
# operator
DISPATCHES = Counter("mikrom_operator_dispatches_total", "Messages sent to node queues, by intent and cause",
                     ["intent", "why"])
DISPATCH_FAILURES = Counter("mikrom_operator_dispatch_failures_total", "Sends that failed (broker unreachable)",
                            ["intent"])
RESCHEDULES = Counter("mikrom_operator_reschedules_total", "MicroVMs taken off a lost node to be placed again")

_served: dict[str, tuple[str, int]] = {}


def serve(settings: Settings, component: str) -> tuple[str, int] | None:
    """Serve /metrics (once per process); None when the port is 0 or cannot be bound (logged)."""
    if component in _served:
        return _served[component]
    if not settings.metrics_port:
        return None
    try:
        server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_address)
    except OSError as exc:
        log.warning("cannot serve metrics on %s:%s: %s", settings.metrics_address, settings.metrics_port, exc)
        return None
    where = server.server_address[:2]
    _served[component] = where
    log.info("serving %s metrics on http://%s:%s/metrics", component, *where)
    return where


_collectors: set[str] = set()


def register_collector(collector) -> None:
    """Install a collector of live gauges (once per kind and process)."""
    name = type(collector).__name__
    if name not in _collectors:
        _collectors.add(name)
        REGISTRY.register(collector)
