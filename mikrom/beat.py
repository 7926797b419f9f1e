"""`python -m mikrom.beat [-s SCHEDULE_FILE] [--loglevel L] [celery beat options]`: Celery beat with
Mikrom's schedule (mikrom.celery_app.beat_schedule), as the original guide's `python run_beat.py`
started it; the same as `celery -A mikrom.celery_app beat --loglevel=info`.

Run exactly one beat per broker: two would send every periodic task twice (harmless, every task
is safe to run twice, but wasteful).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mikrom.beat", description=__doc__.splitlines()[0])
    parser.add_argument("-s", "--schedule", default="celerybeat-schedule",
                        help="where beat keeps the last run time of each entry (default ./celerybeat-schedule)")
    parser.add_argument("--loglevel", default="info")
    args, rest = parser.parse_known_args(argv)

    from mikrom import broker
    from mikrom.settings import Settings

    broker.refuse_to_start(Settings.from_env(), "beat")
    # celery's own command line, so that mikrom.celery_app, loaded by -A, sees that it runs beat
    sys.argv = ["celery", "-A", "mikrom.celery_app", "beat", f"--loglevel={args.loglevel}", "-s", args.schedule, *rest]
    from celery.__main__ import main as celery_main

    return celery_main() or 0


if __name__ == "__main__":
    sys.exit(main())
