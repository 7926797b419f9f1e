"""The tests' overlap check (harness/overlap.py): two VMMs of one VM uid that ran at the same
time, on any node, are found; one after the other is fine."""

from __future__ import annotations

import json

import pytest
from harness.overlap import OverlapChecker, overlaps, runs


def ev(event, where, uid, pid, t, **kw):
    return {"event": event, "where": where, "uid": uid, "pid": pid, "boottime": t, **kw}


def test_a_vm_that_moves_after_its_old_vmm_stopped_does_not_overlap():
    found = overlaps(runs([ev("start", "n1", "u", 10, 1.0), ev("stop", "n1", "u", 10, 5.0, fenced=True),
                           ev("start", "n2", "u", 20, 5.5), ev("stop", "n2", "u", 20, 9.0)]), now=100.0)
    assert found == []


def test_two_vmms_of_one_uid_running_at_once_on_two_nodes_overlap():
    found = overlaps(runs([ev("start", "n1", "u", 10, 1.0), ev("stop", "n1", "u", 10, 6.0),
                           ev("start", "n2", "u", 20, 5.5)]), now=100.0)
    assert [(a.where, b.where) for a, b in found] == [("n1", "n2")]


def test_a_run_without_a_stop_record_counts_as_running_until_now():
    all_runs = runs([ev("start", "n1", "u", 10, 1.0), ev("start", "n2", "u", 20, 50.0)])
    assert len(overlaps(all_runs, now=60.0)) == 1


def test_different_uids_and_a_restart_on_one_node_do_not_overlap():
    found = overlaps(runs([ev("start", "n1", "u", 10, 1.0), ev("stop", "n1", "u", 10, 2.0),
                           ev("start", "n1", "u", 11, 2.5), ev("start", "n2", "v", 30, 1.5)]), now=10.0)
    assert found == []


def test_the_checker_reads_every_node_s_journal_and_fails_on_an_overlap(tmp_path):
    for node, pid, start in (("a", 1, 1.0), ("b", 2, 2.0)):
        vms = tmp_path / node / "vms"
        vms.mkdir(parents=True)
        (vms / "vmm-journal.jsonl").write_text(json.dumps(
            {"event": "start", "uid": "u", "pid": pid, "boottime": start}) + "\nnot json\n")
    checker = OverlapChecker()
    checker.watch(tmp_path / "a")
    checker.watch(tmp_path / "b")
    assert len(checker.runs_of("u")) == 2
    with pytest.raises(AssertionError, match="ran at the same time"):
        checker.assert_no_overlap()
