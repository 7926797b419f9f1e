"""Celery talks to the real Redis with its password; a wrong password is a clear error."""

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from mikrom import broker


def _app(url: str) -> Celery:
    app = Celery("mikrom-foundation-test", broker=url, backend=url)
    app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json",
                    broker_connection_timeout=5, broker_connection_retry_on_startup=False,
                    redis_socket_timeout=5, redis_socket_connect_timeout=5)
    return app


def test_task_goes_through_real_redis_with_password(redis):
    app = _app(redis.url(db=1))

    @app.task(name="mikrom.test.add")
    def add(a, b):
        return a + b

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        result = add.delay(20, 22)
        assert result.get(timeout=20) == 42
    # the message really went through Redis: the result key is there
    assert broker.client(redis.url(db=1)).exists(f"celery-task-meta-{result.id}") == 1


def test_wrong_password_is_a_clear_error(redis):
    with pytest.raises(broker.BrokerUnavailable) as err:
        broker.check(redis.url(password="not-the-password"), timeout=5)
    msg = str(err.value)
    assert "authentication" in msg.lower()
    assert "not-the-password" not in msg  # never echo secrets
    assert f"127.0.0.1:{redis.port}" in msg


def test_unreachable_redis_is_a_clear_error():
    from harness.procs import free_port

    port = free_port()
    with pytest.raises(broker.BrokerUnavailable) as err:
        broker.check(f"redis://:x@127.0.0.1:{port}/0", timeout=2)
    assert f"127.0.0.1:{port}" in str(err.value) and "connect" in str(err.value).lower()


def test_right_password_passes_the_check(redis):
    broker.check(redis.url(), timeout=5)
