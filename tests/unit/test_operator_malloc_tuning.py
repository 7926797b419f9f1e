"""Once the operator fixed glibc's mmap threshold, a large block freed no longer raises it: the
next large block is again a mapping of its own (given back to the system when freed), not heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, sys
    libc = ctypes.CDLL("libc.so.6")
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def mapped(size):
        before = libc.mallinfo2().hblks
        block = libc.malloc(size)
        after = libc.mallinfo2().hblks
        libc.free(block)
        return after - before

    if sys.argv[1] == "fix":
        from mikrom.operator import malloctune
        assert malloctune.fix_mmap_threshold()
    libc.free(libc.malloc(4 << 20))  # a 4 MiB block, mapped and freed: glibc raises its threshold past it
    print(mapped(300 << 10))
""")


def _mapped_after_a_large_free(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_large_block_after_a_larger_one_was_freed_is_still_mapped_once_the_threshold_is_fixed():
    assert _mapped_after_a_large_free("stock") == 0  # glibc's own behaviour: from the heap
    assert _mapped_after_a_large_free("fix") == 1
