"""The pieces around a dispatch that keep its path short: Events recorded in the background after
the dispatches in flight, in order per object, kopf's diff base kept in memory, and no kopf marker
written after a create."""

from __future__ import annotations

import threading

import kopf

from mikrom import names
from mikrom.operator import dispatch
from mikrom.operator.startup import MemoryDiffBaseStorage, UnmarkedAnnotationsProgressStorage


def _vm(uid: str) -> dict:
    return {"apiVersion": "mikrom.io/v1alpha1", "kind": "MicroVM",
            "metadata": {"namespace": "ns", "name": f"vm-{uid}", "uid": uid}}


class Recorder:
    def __init__(self, expect: int):
        self.seen: list[tuple[str, str]] = []
        self.done = threading.Event()
        self.expect = expect
        self.lock = threading.Lock()

    def __call__(self, body, reason, message, warning=False):
        with self.lock:
            self.seen.append((body["metadata"]["uid"], message))
            if len(self.seen) >= self.expect:
                self.done.set()


def test_an_event_waits_while_a_dispatch_is_between_its_write_and_its_send(monkeypatch):
    rec = Recorder(expect=1)
    monkeypatch.setattr(dispatch, "emit", rec)
    notes, flight = dispatch.Notes(), dispatch.InFlight()
    monkeypatch.setattr(dispatch, "IN_FLIGHT", flight)
    with flight:
        notes.submit(_vm("a"), "Scheduled", "placed")
        assert not rec.done.wait(0.3)  # held back while the dispatch is in flight
    assert rec.done.wait(5) and rec.seen == [("a", "placed")]


def test_an_objects_events_keep_their_order(monkeypatch):
    rec = Recorder(expect=60)
    monkeypatch.setattr(dispatch, "emit", rec)
    monkeypatch.setattr(dispatch, "IN_FLIGHT", dispatch.InFlight())
    notes = dispatch.Notes()
    for i in range(20):
        for uid in ("a", "b", "c"):
            notes.submit(_vm(uid), "R", f"{uid}{i}")
    assert rec.done.wait(10)
    for uid in ("a", "b", "c"):
        assert [m for u, m in rec.seen if u == uid] == [f"{uid}{i}" for i in range(20)]


def test_events_past_the_backlog_are_logged_only(monkeypatch, caplog):
    rec = Recorder(expect=2)
    monkeypatch.setattr(dispatch, "emit", rec)
    flight = dispatch.InFlight()
    monkeypatch.setattr(dispatch, "IN_FLIGHT", flight)
    notes = dispatch.Notes()
    notes.MAX_PENDING = 2
    with flight:
        for i in range(3):
            notes.submit(_vm("a"), "Scheduled", f"m{i}")
        assert any("backlog, not recorded" == getattr(r, "event", None) for r in caplog.records)
    assert rec.done.wait(5) and [m for _, m in rec.seen] == ["m0", "m1"]


def test_the_diff_base_lives_in_memory_per_uid_and_is_forgotten_with_the_object():
    storage = MemoryDiffBaseStorage(limit=2)
    a, b, c = (kopf.Body({"metadata": {"uid": u, "name": u}}) for u in ("a", "b", "c"))
    patch = kopf.Patch()
    assert storage.fetch(body=a) is None  # never handled (or handled before a restart): a creation
    storage.store(body=a, patch=patch, essence={"spec": {"vcpus": 1}})
    storage.store(body=b, patch=patch, essence={"spec": {"vcpus": 2}})
    assert storage.fetch(body=a) == {"spec": {"vcpus": 1}} and not patch  # nothing written to the object
    storage.store(body=c, patch=patch, essence={"spec": {"vcpus": 3}})  # over the limit: the oldest goes
    assert storage.fetch(body=a) is None and storage.fetch(body=c) == {"spec": {"vcpus": 3}}
    storage.forget("c")
    assert storage.fetch(body=c) is None


def test_a_stopping_operator_drops_the_events_still_waiting(monkeypatch):
    rec = Recorder(expect=1)
    monkeypatch.setattr(dispatch, "emit", rec)
    taken_up = threading.Event()

    class Flight(dispatch.InFlight):
        def wait_idle(self, timeout: float) -> bool:
            taken_up.set()
            return super().wait_idle(timeout)

    flight = Flight()
    monkeypatch.setattr(dispatch, "IN_FLIGHT", flight)
    notes = dispatch.Notes()
    with flight:
        notes.submit(_vm("a"), "Scheduled", "first")
        assert taken_up.wait(5)  # its lane has it, and waits for the dispatch
        lanes = list(notes._lanes)
        notes.submit(_vm("a"), "Scheduled", "queued")
        notes.close()
        notes.submit(_vm("a"), "Scheduled", "after")
    for lane in lanes:
        lane.shutdown(wait=True)
    assert [m for _, m in rec.seen] == ["first"]


def test_a_handler_that_succeeds_at_once_leaves_no_annotation_not_even_kopfs_marker():
    # kopf stores a handler's progress, then purges it once every handler is done: what is left in
    # the patch is written to the object, one more write (and watch event) per new MicroVM
    storage = UnmarkedAnnotationsProgressStorage(prefix=names.OPERATOR_STORAGE_PREFIX)
    body, patch = kopf.Body({"metadata": {"uid": "a", "name": "a", "annotations": {}}}), kopf.Patch()
    key = kopf.HandlerId("microvm_create")
    storage.store(key=key, record={"started": "2026-12-01T00:00:00", "success": True}, body=body, patch=patch)
    storage.touch(body=body, patch=patch, value=None)
    storage.purge(key=key, body=body, patch=patch)
    assert not patch.get("metadata", {}).get("annotations")
    stock, stock_patch = kopf.AnnotationsProgressStorage(prefix=names.OPERATOR_STORAGE_PREFIX), kopf.Patch()
    stock.store(key=key, record={"success": True}, body=body, patch=stock_patch)
    stock.purge(key=key, body=body, patch=stock_patch)
    assert stock_patch["metadata"]["annotations"]  # what kopf's own storage would have written
