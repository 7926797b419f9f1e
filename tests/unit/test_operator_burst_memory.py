"""What a burst of new MicroVMs leaves in the operator: kopf's per-object workers do not outlive
their objects' last events for long (each holds its object's last watch event, queue and task)."""

from __future__ import annotations

import sys

import kopf

from mikrom.operator import startup
from mikrom.settings import Settings


def test_kopfs_worker_for_an_object_ends_within_five_seconds_of_its_last_event():
    interval = sys.getswitchinterval()
    try:
        kopf_settings = kopf.OperatorSettings()
        startup.configure(kopf_settings, Settings())
    finally:
        sys.setswitchinterval(interval)  # configure sets the process's; keep the test run's
    assert kopf_settings.queueing.idle_timeout <= 5.0
    assert kopf_settings.persistence.consistency_timeout  # a worker awaiting kopf's own patch stays longer
