"""Step timings of one VM task, logged as one line so a slow create can be taken apart.

A task opens a `Steps` record (`begin`) when its message arrives; the code it calls marks the end
of each step with `mark(name)`, wherever it is (the record travels in a context variable, so no
signature carries it, and code run without a record marks nothing). `done()` logs

    timings of NS/NAME: {"get": 7.1, "lock": 0.0, ..., "vmm_exec": 31.5, ...}

milliseconds since the message arrived, in the order the steps ended. `vmm_exec` is the moment
the supervisor started the VMM (its CLOCK_MONOTONIC, which is system-wide, from run.json).
`mark_cpu(name)` records, as `cpu_<name>`, the CPU time the whole worker process (all its threads)
used since the message arrived: how much of a step's wall time was this process's own work.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

log = logging.getLogger(__name__)

_current: contextvars.ContextVar["Steps | None"] = contextvars.ContextVar("mikrom_steps", default=None)


class Steps:
    def __init__(self, what: str, start: float | None = None):
        self.what = what
        self.start = time.monotonic() if start is None else start
        self.cpu_start = time.process_time()
        self.marks: dict[str, float] = {}

    def mark(self, name: str, at: float | None = None) -> None:
        """Record that step `name` ended now (or at CLOCK_MONOTONIC `at`); the first mark wins."""
        self.marks.setdefault(name, round(((time.monotonic() if at is None else at) - self.start) * 1000, 1))

    def line(self) -> str:
        return json.dumps(dict(sorted(self.marks.items(), key=lambda kv: kv[1])))


def begin(what: str) -> contextvars.Token:
    return _current.set(Steps(what))


def current() -> Steps | None:
    return _current.get()


def mark(name: str, at: float | None = None) -> None:
    steps = _current.get()
    if steps is not None:
        steps.mark(name, at)


def mark_cpu(name: str) -> None:
    steps = _current.get()
    if steps is not None:
        steps.marks.setdefault(f"cpu_{name}", round((time.process_time() - steps.cpu_start) * 1000, 1))


def done(token: contextvars.Token) -> None:
    steps = _current.get()
    _current.reset(token)
    if steps is not None and steps.marks:
        log.info("timings of %s: %s", steps.what, steps.line())
