"""`python -m mikrom.worker [--node NODE] [--concurrency N] ...`: the node worker, as the original
guide's `python run_worker.py` started it; the same as `mikrom worker` (mikrom/cli.py).

`python -m mikrom.worker console-relay UID` instead relays a VM's serial console on stdin/stdout
(worker/consolerelay.py). Otherwise it replaces itself with `python -m mikrom.cli worker ...`
(same pid, same options) rather than importing the command line, which also starts the
operator: the worker never imports the operator.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if sys.argv[1:2] == ["console-relay"]:
        # `kubectl mikrom console` through `kubectl exec -i` (worker/consolerelay.py): not a worker
        from .consolerelay import main as relay

        sys.exit(relay(sys.argv[2:]))
    os.execv(sys.executable, [sys.executable, "-m", "mikrom.cli", "worker", *sys.argv[1:]])


if __name__ == "__main__":
    main()
