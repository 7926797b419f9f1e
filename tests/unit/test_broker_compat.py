"""mikrom.broker_compat: the one kombu failure that used to end a worker when Redis restarted with
messages in flight (a channel's unacked restore after its connection was released) is a warning;
every other error of that restore still raises."""

from __future__ import annotations

import pytest
from kombu.transport import redis as kombu_redis

from mikrom import broker_compat


class Released:
    """A channel whose connection let go of its parameters, as after a lost connection."""

    def conn_or_acquire(self, client=None):
        conninfo = None
        return conninfo.hostname  # what kombu's _connparams meets


@pytest.fixture
def qos(monkeypatch):
    monkeypatch.setattr(kombu_redis.QoS, "restore_unacked", kombu_redis.QoS.restore_unacked)
    monkeypatch.setattr(broker_compat, "_INSTALLED", [False])
    q = kombu_redis.QoS.__new__(kombu_redis.QoS)
    q.channel = Released()
    return q


def test_the_unacked_restore_of_a_released_connection_raises_without_the_fix(qos):
    with pytest.raises(AttributeError, match="hostname"):
        qos.restore_unacked()


def test_the_unacked_restore_of_a_released_connection_is_a_warning_once_installed(qos, caplog):
    broker_compat.install()
    assert qos.restore_unacked() is None
    assert "broker connection lost" in caplog.text


def test_any_other_failure_of_the_restore_still_raises(qos, monkeypatch):
    class Broken:
        def conn_or_acquire(self, client=None):
            raise AttributeError("something else entirely")

    broker_compat.install()
    qos.channel = Broken()
    with pytest.raises(AttributeError, match="something else"):
        qos.restore_unacked()
