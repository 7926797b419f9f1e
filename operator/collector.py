"""The operator's live gauges for Prometheus, read from its cluster view at scrape time."""

from __future__ import annotations

from prometheus_client.core import GaugeMetricFamily

from mikrom import conditions, names

from .state import STATE


class OperatorCollector:
    def collect(self):
        phases: dict[str, int] = {}
        for vm in STATE.vms():
            phase = (vm.get("status") or {}).get("phase") or "New"
            phases[phase] = phases.get(phase, 0) + 1
        vms = GaugeMetricFamily("mikrom_microvms", "MicroVMs the operator watches, by phase", labels=["phase"])
        for phase, count in sorted(phases.items()):
            vms.add_metric([phase], count)
        yield vms
        yield GaugeMetricFamily("mikrom_operator_microvms_reconciled",
                                "MicroVMs a reconcile of this process has taken up since it started (after a "
                                "restart: how far it has caught up with mikrom_microvms)", value=STATE.reconciled())
        nodes = GaugeMetricFamily("mikrom_microvmnodes", "MicroVMNodes by their Ready condition", labels=["ready"])
        ready = {"True": 0, "False": 0, "Unknown": 0}
        for node in STATE.nodes().values():
            cond = conditions.get((node.get("status") or {}).get("conditions"), names.READY) or {}
            key = cond.get("status") if cond.get("status") in ready else "Unknown"
            ready[key] += 1
        for key, count in ready.items():
            nodes.add_metric([key], count)
        yield nodes
