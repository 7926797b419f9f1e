"""The worker's live gauges for Prometheus, read from the node agent and the state directory at
scrape time."""

from __future__ import annotations

import time

from prometheus_client.core import GaugeMetricFamily

from .state import local_uids, vmm_processes


class WorkerCollector:
    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        ctx = self.ctx
        agent = ctx.agent
        labels = ["node"]
        age = GaugeMetricFamily("mikrom_worker_heartbeat_age_seconds",
                                "Seconds since the worker last renewed its MicroVMNode heartbeat", labels=labels)
        age.add_metric([ctx.node], max(0.0, time.monotonic() - agent.last_ok))
        yield age
        fenced = GaugeMetricFamily("mikrom_worker_fenced", "1 while the worker has fenced itself (stopped its VMs)",
                                   labels=labels)
        fenced.add_metric([ctx.node], 1.0 if agent.fenced else 0.0)
        yield fenced
        local = GaugeMetricFamily("mikrom_worker_local_vms", "VMs with a state directory on this node",
                                  labels=labels)
        local.add_metric([ctx.node], len(local_uids(ctx.runtime.vms_dir)))
        yield local
        procs = GaugeMetricFamily("mikrom_worker_vmm_processes", "Live VMM processes on this node", labels=labels)
        procs.add_metric([ctx.node], sum(len(p) for p in vmm_processes(ctx.runtime.vms_dir).values()))
        yield procs
