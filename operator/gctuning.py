"""The operator's garbage collector, set for short pauses.

CPython's cyclic collector stops every thread while it walks a generation. A full (oldest
generation) collection walks every container object in the process, most of them kopf's, the
kubernetes client's and the standard library's modules, which live as long as the process: with
all of that in the oldest generation, full collections paused the operator for 100-250 ms, and a
create arriving then waited for them (the outliers of bench/dispatch.py's single creates).

`freeze` is called once the operator is started: what is alive then moves to the collector's
permanent generation, which no collection walks again (those objects are not garbage; kopf's
handlers and settings, the imported modules). Later objects, the operator's view of the cluster
included, are collected as before.
"""

from __future__ import annotations

import gc


def freeze() -> int:
    """Collect once, then move every object alive to the permanent generation; returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
