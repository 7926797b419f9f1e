"""The broker's credentials: a Redis URL without a password is refused unless explicitly allowed,
the password never shows in the settings' repr or in what is logged, and `rediss://` and
`sentinel://` get the options Celery needs."""

from __future__ import annotations

import ssl

import pytest
from celery import Celery

from mikrom import broker
from mikrom.celery_app import celery_command, configure
from mikrom.settings import Settings, masked_url, url_password

SECRET = "s3cr3t-Pa55word"


def test_repr_and_str_of_settings_mask_every_password():
    s = Settings(broker_url=f"redis://:{SECRET}@redis.mikrom:6379/0",
                 result_backend=f"redis://user:{SECRET}x@results:6379/1?password={SECRET}y",
                 redis_password=SECRET + "z")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", repr([s])):
        assert SECRET not in text, text
        assert "redis.mikrom:6379/0" in text and "results:6379/1" in text  # the rest still helps a reader
    assert "redis_password='********'" in repr(s)
    assert s.broker == f"redis://:{SECRET}@redis.mikrom:6379/0"  # still there for the clients


def test_settings_read_from_the_environment_keep_the_password_out_of_repr():
    s = Settings.from_env({"MIKROM_BROKER_URL": "redis://redis:6379/0", "MIKROM_REDIS_PASSWORD": SECRET})
    assert SECRET not in repr(s)
    assert url_password(s.broker) == SECRET and url_password(s.backend) == SECRET


def test_a_sentinel_list_gets_the_password_on_every_sentinel_and_masks_each():
    s = Settings(broker_url="sentinel://s1:26379/0;sentinel://s2:26379/0", redis_password=SECRET)
    assert [url_password(p) for p in s.broker.split(";")] == [SECRET, SECRET]
    assert SECRET not in masked_url(s.broker) and masked_url(s.broker).count("********") == 2


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://:@127.0.0.1:6379/0", "rediss://redis:6380/0",
                                 "redis://user@redis:6379/0", "sentinel://:pw@s1:26379;sentinel://s2:26379"])
def test_a_redis_broker_without_a_password_is_refused(url):
    with pytest.raises(broker.InsecureBroker) as err:
        broker.require_password(Settings(broker_url=url))
    assert "MIKROM_BROKER_URL" in str(err.value) and "MIKROM_BROKER_ALLOW_NO_PASSWORD" in str(err.value)
    assert err.value.reason == "InsecureBroker"


def test_a_result_backend_without_a_password_is_refused_and_the_brokers_password_is_not_echoed():
    s = Settings(broker_url=f"redis://:{SECRET}@redis:6379/0", result_backend="redis://results:6379/1")
    with pytest.raises(broker.InsecureBroker) as err:
        broker.require_password(s)
    assert "MIKROM_RESULT_BACKEND (redis://results:6379/1)" in str(err.value)
    assert "MIKROM_BROKER_URL" not in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("settings", [
    Settings(broker_url=f"redis://:{SECRET}@redis:6379/0"),
    Settings(broker_url="redis://redis:6379/0", redis_password=SECRET),
    Settings(broker_url=f"rediss://default:{SECRET}@redis:6380/0", result_backend=f"redis://:{SECRET}@r:6379/1"),
    Settings(broker_url="redis://localhost:6379/0", broker_allow_no_password=True),
    Settings.from_env({"MIKROM_BROKER_URL": "redis://localhost:6379/0", "MIKROM_BROKER_ALLOW_NO_PASSWORD": "true"}),
])
def test_a_password_or_the_explicit_insecure_setting_passes(settings):
    broker.require_password(settings)


def test_the_refusal_at_start_exits_2_with_one_line_naming_the_setting(capsys):
    with pytest.raises(SystemExit) as exit_:
        broker.refuse_to_start(Settings(broker_url="redis://10.0.0.9:6379/0",
                                        result_backend=f"redis://:{SECRET}@r:6379/1"), "beat")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mikrom beat: refusing to start: MIKROM_BROKER_URL (redis://10.0.0.9:6379/0)")
    assert SECRET not in err


def test_tls_options_verify_the_certificate_and_host_name_by_default():
    opts = broker.tls_options(Settings(broker_ca_file="/etc/mikrom/ca.crt"))
    assert opts == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": "/etc/mikrom/ca.crt"}
    none = broker.tls_options(Settings(broker_cert_reqs="none"))
    assert none == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_check_hostname": False}
    client = broker.tls_options(Settings(broker_cert_file="/c.pem", broker_key_file="/k.pem"))
    assert (client["ssl_certfile"], client["ssl_keyfile"]) == ("/c.pem", "/k.pem")


@pytest.mark.parametrize("changes, field", [({"broker_cert_reqs": "maybe"}, "MIKROM_BROKER_CERT_REQS"),
                                            ({"broker_cert_file": "/c.pem"}, "MIKROM_BROKER_KEY_FILE")])
def test_tls_settings_that_make_no_sense_are_refused_naming_the_setting(changes, field):
    with pytest.raises(broker.InsecureBroker, match=field):
        broker.tls_options(Settings(**changes))


def test_a_rediss_broker_and_backend_get_celerys_ssl_options_from_the_settings():
    app = Celery("t")
    configure(app, Settings(broker_url=f"rediss://:{SECRET}@redis:6380/0", broker_ca_file="/ca.crt"))
    want = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_check_hostname": True, "ssl_ca_certs": "/ca.crt"}
    assert app.conf.broker_use_ssl == want and app.conf.redis_backend_use_ssl == want
    plain = Celery("t2")
    configure(plain, Settings(broker_url=f"redis://:{SECRET}@redis:6379/0"))
    assert not plain.conf.broker_use_ssl and not plain.conf.redis_backend_use_ssl


def test_a_sentinel_broker_names_its_master_in_the_transport_options():
    app = Celery("t")
    configure(app, Settings(broker_url=f"sentinel://:{SECRET}@s1:26379/0;sentinel://:{SECRET}@s2:26379/0",
                            broker_sentinel_master="mikrom"))
    assert app.conf.broker_transport_options["master_name"] == "mikrom"
    assert app.conf.result_backend_transport_options["master_name"] == "mikrom"
    assert app.conf.broker_transport_options["visibility_timeout"] >= 3600


def test_celerys_censored_configuration_masks_the_broker_and_backend_passwords():
    app = Celery("t")
    configure(app, Settings(broker_url=f"redis://:{SECRET}@redis:6379/0"))
    table = app.conf.table(with_defaults=False)  # what `celery inspect conf` and `celery report` show
    assert SECRET not in repr(table)
    assert "redis:6379" in str(table["broker_url"])


def test_redacted_urls_keep_only_scheme_host_port_and_path():
    assert broker.redacted(f"rediss://user:{SECRET}@redis:6380/2?ssl_cert_reqs=required") == "rediss://redis:6380/2"
    assert broker.redacted(f"sentinel://:{SECRET}@s1:26379/0;sentinel://s2") == "sentinel://s1:26379/0;sentinel://s2"


@pytest.mark.parametrize("argv, command", [
    (["/usr/bin/celery", "-A", "mikrom.celery_app", "worker", "--loglevel=info"], "worker"),
    (["/venv/lib/python3.11/site-packages/celery/__main__.py", "-A", "mikrom.celery_app", "beat"], "beat"),
    (["celery", "--app=mikrom.celery_app", "flower", "--port=5555"], "flower"),
    (["celery", "-A", "mikrom.celery_app", "inspect", "ping", "-d", "worker"], "inspect"),
    (["pytest", "-k", "worker"], None),
    (["/usr/bin/mikrom", "operator"], None),
])
def test_the_celery_subcommand_is_recognised_only_on_celerys_command_line(argv, command):
    assert celery_command(argv) == command
