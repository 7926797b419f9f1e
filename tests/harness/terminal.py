"""A pty for tests of interactive commands (`kubectl mikrom console`): the test holds the master
side, the command under test gets the slave side as its terminal."""

from __future__ import annotations

import os
import select
import time


class Terminal:
    """The test's side of a pty whose other side is the plugin's terminal."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.seen = b""

    def expect(self, needle: bytes, timeout: float = 30) -> bytes:
        """What the terminal showed up to `needle`, read as it arrives."""
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"{needle!r} not shown within {timeout}s; the terminal showed {self.seen[-2000:]!r}")
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every holder of the other side closed it
                data = b""
            if not data:
                raise AssertionError(f"the terminal closed before {needle!r}; it showed {self.seen[-2000:]!r}")
            self.seen += data
        return self.seen

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
