"""Where each task goes: broadcast maintenance, a queue the caller names, everything else on `mikrom`."""

from __future__ import annotations

import pytest

from mikrom import names
from mikrom.celery_app import app, route_task


@pytest.mark.parametrize("task", [names.SYNC_VM_STATUS, names.CLEANUP_OLD_VMS, names.HEALTH_CHECK])
def test_per_node_maintenance_is_broadcast_through_the_fanout_exchange(task):
    route = route_task(task, (), {}, {})
    assert (route["queue"], route["exchange"], route["routing_key"]) == (names.BROADCAST_QUEUE,) * 3
    assert [(e.name, e.type) for e in route["declare"]] == [(names.BROADCAST_QUEUE, "fanout")]


@pytest.mark.parametrize("task", [names.GENERATE_REPORT, names.CREATE_VM])
def test_the_rest_goes_to_the_default_queue(task):
    assert route_task(task, (), {}, {}) == {"queue": names.DEFAULT_QUEUE, "routing_key": names.DEFAULT_QUEUE}


def test_every_task_of_the_beat_schedule_is_registered_and_routed():
    import mikrom.worker.tasks  # noqa: F401 - registers the tasks

    for entry in app.conf.beat_schedule.values():
        assert entry["task"] in app.tasks
        assert route_task(entry["task"], (), {}, {})["queue"] in (names.BROADCAST_QUEUE, names.DEFAULT_QUEUE)


@pytest.mark.parametrize("task", [names.HEALTH_CHECK, names.SYNC_VM_STATUS, names.CREATE_VM])
def test_a_queue_named_by_the_caller_wins(task):
    ref = {"namespace": "a", "name": "b", "uid": "c"}
    assert route_task(task, (), ref, {"queue": "mikrom.node.kvm-2"}) is None
    message = app.amqp.router.route({"queue": "mikrom"}, task, (), ref)
    assert message["queue"].name == "mikrom"
    assert message["queue"].exchange.name == "mikrom" and message["queue"].exchange.type == "direct"
