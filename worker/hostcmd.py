"""Running the node's networking commands (`ip`, `iptables`, `nft`).

One place for what every such call needs: an optional network namespace to act inside (`ip netns
exec`), a timeout so a wedged command cannot stall the worker, and a failure raised as NetdevError,
which tells the caller that what should happen next is a retry of the task.
"""

from __future__ import annotations

import subprocess

from . import spawn

COMMAND_TIMEOUT = 10.0
"""Seconds any one `ip`/`iptables`/`nft` call may take."""


class NetdevError(RuntimeError):
    """A host networking command failed; what should happen next is a retry of the task."""

    reason = "NetworkSetupFailed"


def run(cmd: list[str], netns: str | None = None, check: bool = True, timeout: float = COMMAND_TIMEOUT,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` (inside `netns` when given) with `stdin` as its input (none by default)."""
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    try:
        # posix_spawn, not a fork of the worker: a few milliseconds per call, and the hub runs on
        res = spawn.run(cmd, timeout=timeout, input=stdin)
    except subprocess.TimeoutExpired as exc:
        raise NetdevError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
    except FileNotFoundError as exc:
        raise NetdevError(f"{cmd[0]} not found: {exc}") from exc
    if check and res.returncode != 0:
        raise NetdevError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res
