"""A real redis-server on a free loopback port, with a password."""

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
    proc: procs.Proc

    def url(self, db: int = 0, password: str | None = None) -> str:
        return f"redis://:{password if password is not None else self.password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.proc.stop()


def start(workdir: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if not binary:
        raise FileNotFoundError("redis-server: not installed (apt-get install redis-server; `make test` does it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    password = secrets.token_hex(16)
    conf = workdir / "redis.conf"
    # the password goes in a file, not argv, so `ps` does not show it
    conf.write_text(
        f"bind 127.0.0.1\nport {port}\nrequirepass {password}\nsave \"\"\nappendonly no\n"
        f"dir {workdir}\nprotected-mode yes\ndaemonize no\n"
    )
    proc = procs.start("redis-server", [binary, str(conf)], workdir)
    try:
        procs.wait_port(port, 30, proc)
    except BaseException:
        proc.stop()
        raise
    return RedisServer(port=port, password=password, proc=proc)
