"""Run a few independent steps of one task at the same time.

Under the gevent worker `threading` is monkey-patched, so each step is a greenlet: steps that wait
on the API server, a subprocess or a download overlap instead of adding up. Without gevent (the
CLI, unit tests) they are threads. Every step runs to its end before `run` returns, whatever the
others did, so the caller never acts while a step is still changing the node; each step sees the
caller's context variables (worker/timing.py).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Outcomes:
    results: dict[str, object] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def first_error(self, *order: str) -> BaseException | None:
        """The error of the first step in `order` that failed (then of any other step), or None."""
        for name in (*order, *self.errors):
            if name in self.errors:
                return self.errors[name]
        return None


def in_os_thread(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` as a step that runs in a real OS thread under gevent (gevent's thread pool), for work
    made of blocking system calls and no subprocess (scanning /proc, creating cgroups): those
    calls release the GIL, so the event loop and the other steps go on meanwhile instead of
    waiting for each call. Without gevent it is `fn` itself (steps are threads already)."""
    def call():
        try:
            from gevent import get_hub, monkey
        except ImportError:
            return fn()
        if not monkey.is_module_patched("threading"):
            return fn()
        ok, value = get_hub().threadpool.apply(contextvars.copy_context().run, (_captured, fn))
        if ok:
            return value
        raise value  # here, in the step's own greenlet (the pool would print it as a crash)
    return call


def _captured(fn: Callable[[], object]) -> tuple[bool, object]:
    try:
        return True, fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
        return False, exc


def run(**steps: Callable[[], object]) -> Outcomes:
    """Run every step (keyword: name, value: a callable without arguments) concurrently; the last
    one runs in the caller's own thread or greenlet. Returns each step's result or exception."""
    out = Outcomes()
    items = list(steps.items())

    def one(name: str, fn: Callable[[], object]) -> None:
        try:
            out.results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, who decides
            out.errors[name] = exc

    threads = []
    for name, fn in items[:-1]:
        ctx = contextvars.copy_context()
        thread = threading.Thread(target=ctx.run, args=(one, name, fn), name=f"step-{name}", daemon=True)
        thread.start()
        threads.append(thread)
    if items:
        one(*items[-1])
    for thread in threads:
        thread.join()
    return out
