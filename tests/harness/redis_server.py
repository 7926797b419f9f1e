"""A real redis-server on a free loopback port, with a password; it can be stopped and started
again on the same port (to test what happens while Redis is away)."""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import procs


@dataclass
class RedisServer:
    port: int
    password: str
    workdir: Path
    proc: procs.Proc | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        return f"redis://:{password if password is not None else self.password}@127.0.0.1:{self.port}/{db}"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if not binary:
            raise FileNotFoundError("redis-server: not installed (apt-get install redis-server; `make test` does it)")
        conf = self.workdir / "redis.conf"
        # the password goes in a file, not argv, so `ps` does not show it
        conf.write_text(
            f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\nsave \"\"\nappendonly no\n"
            f"dir {self.workdir}\nprotected-mode yes\ndaemonize no\n"
        )
        self.proc = procs.start(f"redis-server-{self.port}", [binary, str(conf)], self.workdir)
        try:
            procs.wait_port(self.port, 30, self.proc)
        except BaseException:
            self.proc.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def restart(self) -> "RedisServer":
        """Stop the server and start an empty one on the same port with the same password (no
        persistence: every queue, result and key is gone, as after a pod restart without a volume)."""
        old = self.proc
        self.stop()
        self.start()
        # the session's list of servers (log tails, the loopback check) follows the new process
        procs.STARTED[:] = [self.proc if p is old else p for p in procs.STARTED]
        return self


def start(workdir: Path) -> RedisServer:
    workdir.mkdir(parents=True, exist_ok=True)
    return RedisServer(port=procs.free_port(), password=secrets.token_hex(16), workdir=workdir).start()
