"""Reading /proc files in a scan: one plain descriptor read per file, no file object per read."""

from __future__ import annotations

import os


def read(path: str, size: int = 65536) -> bytes:
    """The first `size` bytes of a /proc file, b"" if it cannot be read (the process went)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, size)
    except OSError:
        return b""
    finally:
        os.close(fd)
