"""The `mikrom` command: `mikrom operator`, `mikrom worker`, `mikrom crds`, `mikrom version`."""

from __future__ import annotations

import argparse
import os
import sys


def _operator(args: argparse.Namespace) -> int:
    from mikrom import broker
    from mikrom.settings import Settings

    broker.refuse_to_start(Settings.from_env(), "operator")
    from mikrom.operator import main as operator_main

    return operator_main.run(standalone=args.standalone, liveness=args.liveness, peering=args.peering,
                             verbose=args.verbose)


def _worker(args: argparse.Namespace) -> int:
    from mikrom import broker, names
    from mikrom.settings import Settings

    settings = Settings.from_env()
    broker.refuse_to_start(settings, "worker")
    node = args.node or settings.node_name
    os.environ["MIKROM_NODE_NAME"] = node
    argv = ["celery", "-A", "mikrom.celery_app", "worker", "--pool=gevent", f"--concurrency={args.concurrency}",
            f"--loglevel={args.loglevel}", "-Q", f"{names.node_queue(node)},{names.DEFAULT_QUEUE},{names.BROADCAST_QUEUE}",
            "-n", f"mikrom@{node}", f"--time-limit={settings.task_time_limit}",
            f"--soft-time-limit={settings.task_soft_time_limit}", *args.celery_args]
    from celery.__main__ import main as celery_main

    sys.argv = argv
    return celery_main()


def _crds(args: argparse.Namespace) -> int:
    from mikrom import crdgen

    if args.output:
        from pathlib import Path
        crdgen.write(Path(args.output))
    else:
        sys.stdout.write("---\n".join(crdgen.render_all().values()))
    return 0


def _version(args: argparse.Namespace) -> int:
    import mikrom
    print(mikrom.__version__)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mikrom", description="Kubernetes-native microVMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    op = sub.add_parser("operator", help="run the operator (kopf)")
    op.add_argument("--standalone", action="store_true", help="no peering: the only replica")
    op.add_argument("--peering", default=os.environ.get("MIKROM_PEERING", "mikrom"), help="kopf peering name")
    op.add_argument("--liveness", default=os.environ.get("MIKROM_LIVENESS", ""), help="e.g. http://0.0.0.0:8080/healthz")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(func=_operator)

    wk = sub.add_parser("worker", help="run this node's worker (celery gevent)")
    wk.add_argument("--node", default="", help="node name (default: MIKROM_NODE_NAME, NODE_NAME, hostname)")
    wk.add_argument("--concurrency", type=int, default=100)
    wk.add_argument("--loglevel", default="info")
    wk.add_argument("celery_args", nargs=argparse.REMAINDER, help="extra celery worker options")
    wk.set_defaults(func=_worker)

    crds = sub.add_parser("crds", help="print (or write with -o DIR) the CRDs")
    crds.add_argument("-o", "--output", default="")
    crds.set_defaults(func=_crds)

    ver = sub.add_parser("version")
    ver.set_defaults(func=_version)

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
