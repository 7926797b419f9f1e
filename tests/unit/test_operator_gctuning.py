"""The operator's collector: what is alive at startup is never walked by a collection again."""

from __future__ import annotations

import gc

from mikrom.operator import gctuning


def test_objects_alive_at_startup_leave_the_collected_generations_and_later_ones_do_not():
    before = [["kept"]]  # lists are always tracked by the collector
    try:
        frozen = gctuning.freeze()
        after = [["made later"]]
        assert frozen == gc.get_freeze_count() > 0
        alive = {id(o) for o in gc.get_objects()}
        assert id(before) not in alive and id(after) in alive
    finally:
        gc.unfreeze()
