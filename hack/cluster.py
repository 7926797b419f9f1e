#!/usr/bin/env python3
"""Start or stop the test cluster outside pytest (root): `make cluster` / `make cluster-down`.

    hack/cluster.py up   [--state DIR]   start it, print its kubeconfig and ingress URL, leave it running
    hack/cluster.py down [--state DIR]   stop it and remove everything it made
    hack/cluster.py status [--state DIR] print its state file

DIR defaults to ~/.cache/mikrom/cluster. With `MIKROM_TEST_CLUSTER=DIR` the cluster tests use
this cluster instead of starting their own. See tests/harness/cluster.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import cluster  # noqa: E402 - the harness lives beside the tests

DEFAULT_STATE = Path.home() / ".cache" / "mikrom" / "cluster"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = ap.parse_args()
    if args.command == "up":
        args.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        t0 = time.monotonic()
        c = cluster.up(args.state)
        print(f"cluster up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        print(f"export KUBECONFIG={c.kubeconfig}")
        print(f"# ingress: {c.ingress_url}   logs: {c.layout.log_dir}   state: {args.state}")
        print(f"# tests against it: MIKROM_TEST_CLUSTER={args.state} make test")
    elif args.command == "down":
        t0 = time.monotonic()
        cluster.down(args.state)
        print(f"cluster down in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    else:
        path = args.state / cluster.STATE_FILE
        if not path.exists():
            print(f"no cluster in {args.state}", file=sys.stderr)
            return 1
        print(json.dumps(json.loads(path.read_text()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
