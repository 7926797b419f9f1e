"""A worker must outlive a Redis restart with messages in flight.

When the broker connection drops, Celery's consumer closes the old connection before it reconnects
(`on_connection_error_after_connected`), and closing the Redis channel restores its unacknowledged
messages (`QoS.restore_unacked`). In the kombu pinned here that restore can run after the
connection has let go of its parameters, and fails with `AttributeError: 'NoneType' object has no
attribute 'hostname'`, which is not among the errors the close ignores: the consumer's error
becomes the worker's "Unrecoverable error" and the whole process exits, VMs' leases included.

`install()` makes that one failure a logged warning: the restore is skipped for the lost
connection, and nothing is lost by it, because the messages are still in Redis's unacked set
(restored by the transport's visibility timeout, or redelivered by the sender), or Redis lost them
with its restart, in which case there was nothing to restore. Every other error is raised as before.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

_INSTALLED = [False]


def install() -> None:
    if _INSTALLED[0]:
        return
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.restore_unacked

    @functools.wraps(original)
    def restore_unacked(self, client=None):
        try:
            return original(self, client)
        except AttributeError as exc:
            if "hostname" not in str(exc):
                raise
            log.warning("broker connection lost: unacknowledged messages of the closed channel are left "
                        "to Redis (the connection was already released: %s)", exc)
            return None

    kombu_redis.QoS.restore_unacked = restore_unacked
    _INSTALLED[0] = True
