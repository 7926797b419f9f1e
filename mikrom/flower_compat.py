"""Keep the original guide's Flower command line working on Flower 2.

The guide runs `celery -A mikrom.celery_app flower ... --broker_api=redis://localhost:6379/0`.
`--broker_api` only ever meant RabbitMQ's management API; Flower 1 ignored it for Redis, Flower 2
refuses to start. This accepts a Redis URL there again, as Flower 1 did: Flower reads Redis queue
lengths through the broker connection anyway.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

log = logging.getLogger(__name__)


def install() -> None:
    try:
        import flower.command as command
    except ImportError:  # Flower not installed: nothing to keep compatible
        return
    original = command.validate_broker_api
    if getattr(original, "_mikrom", False):
        return

    def validate_broker_api(url: str) -> None:
        if urlsplit(url).scheme in ("redis", "rediss"):
            log.info("--broker_api=%s:// is for RabbitMQ's management API; Redis is read through the broker",
                     urlsplit(url).scheme)
            return
        original(url)

    validate_broker_api._mikrom = True
    command.validate_broker_api = validate_broker_api
