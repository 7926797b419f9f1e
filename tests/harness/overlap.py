"""The "never in two places" check: from the VMM journals every supervisor writes (start and stop
of each VMM with its CLOCK_BOOTTIME time, `<state_dir>/vms/vmm-journal.jsonl`, see
worker/vmm/consolecap.py), find two VMMs of one VM uid that ever ran at the same time.

The e2e tests run several workers on one host, each with its own state directory, so their
supervisors' CLOCK_BOOTTIME times are comparable. The journals outlive each VM's directory. A
run with no stop record counts as running until now (if its VMM is gone, it died unrecorded,
and the check cannot prove it stopped earlier): the check errs towards reporting an overlap.

    checker = OverlapChecker()
    checker.watch(worker.state_dir)
    ...
    checker.assert_no_overlap()

The `overlap` fixture does this for every worker made by `make_worker` in the test, at the end.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

JOURNAL = "vmm-journal.jsonl"


@dataclass(frozen=True)
class Run:
    """One VMM's life: where (the node's vms dir), which VM, its pid, start and stop (boottime)."""

    where: str
    uid: str
    pid: int
    start: float
    stop: float | None
    fenced: bool = False

    def end(self, now: float) -> float:
        return now if self.stop is None else self.stop

    def __str__(self) -> str:
        stop = "still running" if self.stop is None else f"{self.stop:.3f}" + (" (fenced)" if self.fenced else "")
        return f"uid {self.uid} pid {self.pid} in {self.where}: {self.start:.3f} .. {stop}"


def read_journal(vms_dir: str | Path) -> list[dict]:
    """Every event of one node's journal (the rotated generation first); torn lines are skipped."""
    out = []
    for name in (JOURNAL + ".1", JOURNAL):
        try:
            text = (Path(vms_dir) / name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                event["where"] = str(vms_dir)
                out.append(event)
    return out


def runs(events: list[dict]) -> list[Run]:
    """Pair each start with the stop of the same VMM (node, uid, pid)."""
    starts: dict[tuple, dict] = {}
    stops: dict[tuple, dict] = {}
    for e in events:
        key = (e.get("where"), e.get("uid"), e.get("pid"))
        if e.get("event") == "start":
            starts[key] = e
        elif e.get("event") == "stop":
            stops[key] = e
    out = []
    for key, s in starts.items():
        stop = stops.get(key)
        if stop is not None and stop["boottime"] < s["boottime"]:
            stop = None  # a recycled pid's old stop; this run has none yet
        out.append(Run(where=str(key[0]), uid=str(key[1]), pid=int(key[2]), start=float(s["boottime"]),
                       stop=float(stop["boottime"]) if stop else None, fenced=bool(stop and stop.get("fenced"))))
    return sorted(out, key=lambda r: (r.uid, r.start))


def overlaps(all_runs: list[Run], now: float) -> list[tuple[Run, Run]]:
    """Pairs of runs of one uid whose lives intersect."""
    found = []
    by_uid: dict[str, list[Run]] = {}
    for r in all_runs:
        by_uid.setdefault(r.uid, []).append(r)
    for group in by_uid.values():
        group.sort(key=lambda r: r.start)
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                if b.start < a.end(now) and a.start < b.end(now):
                    found.append((a, b))
    return found


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class OverlapChecker:
    def __init__(self):
        self.vms_dirs: list[Path] = []

    def watch(self, state_dir: str | Path) -> None:
        """A worker's state directory (its journal is under `vms/`)."""
        vms = Path(state_dir) / "vms"
        if vms not in self.vms_dirs:
            self.vms_dirs.append(vms)

    def runs(self) -> list[Run]:
        return runs([e for d in self.vms_dirs for e in read_journal(d)])

    def runs_of(self, uid: str) -> list[Run]:
        return [r for r in self.runs() if r.uid == uid]

    def assert_no_overlap(self) -> None:
        found = overlaps(self.runs(), boottime())
        assert not found, "VMMs of one VM ran at the same time:\n" + "\n".join(f"  {a}\n  {b}" for a, b in found)


@pytest.fixture
def overlap(make_worker):
    """Checks, at the end of the test, every worker the test made: no VM ran in two places."""
    checker = OverlapChecker()
    original = make_worker

    def make(*args, **kwargs):
        w = original(*args, **kwargs)
        checker.watch(w.state_dir)
        return w

    checker.make_worker = make
    yield checker
    checker.assert_no_overlap()
