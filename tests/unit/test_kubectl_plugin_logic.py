"""The kubectl plugin's pure parts: the patches it writes, its --for and --timeout syntax, and the
table `list` prints."""

import argparse
import datetime as dt

import pytest

from mikrom import kubectl_plugin as kp


def _vm(strategy=None, annotations=None, **status):
    spec = {"vcpus": 1, "memoryMiB": 256}
    if strategy:
        spec["runStrategy"] = strategy
    return {"metadata": {"name": "v", "namespace": "ns", "resourceVersion": "7", "annotations": annotations or {},
                         "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": spec, "status": status}


def test_stop_records_the_run_strategy_and_carries_the_resource_version():
    body = kp.stop_patch(_vm("RerunOnFailure"))
    assert body == {"metadata": {"resourceVersion": "7", "annotations": {kp.ANNOTATION_PREVIOUS_RUN_STRATEGY: "RerunOnFailure"}},
                    "spec": {"runStrategy": "Halted"}}
    assert kp.stop_patch(_vm())["metadata"]["annotations"][kp.ANNOTATION_PREVIOUS_RUN_STRATEGY] == "Always"
    assert kp.stop_patch(_vm("Halted")) is None


def test_start_restores_a_valid_recorded_strategy_only():
    assert kp.start_patch(_vm("Halted", {kp.ANNOTATION_PREVIOUS_RUN_STRATEGY: "Once"}))["spec"] == {"runStrategy": "Once"}
    # a hand-edited annotation cannot make start write something the CRD would refuse, or Halted again
    for bad in ("Halted", "Sometimes", ""):
        body = kp.start_patch(_vm("Halted", {kp.ANNOTATION_PREVIOUS_RUN_STRATEGY: bad}))
        assert body["spec"] == {"runStrategy": "Always"}
    assert kp.start_patch(_vm("Always")) is None


def test_for_accepts_phases_and_conditions_and_names_the_valid_forms():
    assert kp.parse_for("phase=Running") == ("phase", "Running")
    assert kp.parse_for("condition=Ready") == ("condition", "Ready=True")
    assert kp.parse_for("condition=Ready=False") == ("condition", "Ready=False")
    with pytest.raises(argparse.ArgumentTypeError, match="phase=<Pending"):
        kp.parse_for("phase=running")


def test_holds_reads_phase_and_condition_status():
    vm = _vm(phase="Running", conditions=[{"type": "Ready", "status": "False"}])
    assert kp.holds(vm, "phase", "Running")
    assert not kp.holds(vm, "condition", "Ready=True")
    assert kp.holds(vm, "condition", "Ready=False")
    assert not kp.holds(_vm(), "condition", "Ready=True")


def test_timeouts_take_kubectls_duration_syntax():
    assert [kp.parse_duration(v) for v in ("90", "90s", "5m", "1h")] == [90, 90, 300, 3600]
    with pytest.raises(argparse.ArgumentTypeError, match="--timeout"):
        kp.parse_duration("soon")


def test_age_reads_like_kubectls():
    now = dt.datetime(2026, 1, 3, 0, 0, 0, tzinfo=dt.timezone.utc)
    at = lambda **kw: (now - dt.timedelta(**kw)).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    assert [kp.age(at(seconds=45), now), kp.age(at(minutes=12), now), kp.age(at(hours=5), now),
            kp.age(at(days=2), now)] == ["45s", "12m", "5h", "2d"]
    assert kp.age(None) == "<unknown>"


def test_drain_waits_for_every_phase_in_which_a_vmm_may_run():
    for phase in ("Scheduled", "Provisioning", "Running", "Stopping", "Unknown", None):
        assert kp.still_running(_vm(phase=phase)), phase
    for phase in ("Stopped", "Succeeded", "Failed"):
        assert not kp.still_running(_vm(phase=phase)), phase


def test_console_path_refuses_a_uid_that_leaves_the_state_directory():
    assert str(kp.console_path("/var/lib/mikrom", "abc-1")) == "/var/lib/mikrom/vms/abc-1/console.log"
    for bad in ("../etc", "..", "", "a/b"):
        with pytest.raises(kp.PluginError):
            kp.console_path("/var/lib/mikrom", bad)


def _terminal_session(typed: bytes, remote_says: bytes = b"", hang_up: bool = False):
    """Run `interactive` on a pty (the terminal) and a socket pair (the console): what reached the
    console, what the terminal showed, the terminal's settings during and after, the result."""
    import os
    import socket
    import termios
    import threading

    master, slave = os.openpty()
    ours, console = socket.socketpair()
    before = termios.tcgetattr(slave)
    during = {}
    result = {}

    def run():
        result["detached"] = kp.interactive(ours.fileno(), ours.fileno(), stdin=slave, stdout=slave, stderr=slave,
                                            banner="hi\r\n")

    thread = threading.Thread(target=run)
    thread.start()
    assert os.read(master, 100) == b"hi\r\n"  # the banner comes once the terminal is raw
    during["settings"] = termios.tcgetattr(slave)
    if remote_says:
        console.sendall(remote_says)
        shown = b""
        while len(shown) < len(remote_says):
            shown += os.read(master, 100)
        during["shown"] = shown
    os.write(master, typed)
    if hang_up:
        console.close()
    thread.join(10)
    assert not thread.is_alive()
    received = b""
    if not hang_up:
        console.settimeout(1)
        console.shutdown(socket.SHUT_WR)
        try:
            while chunk := console.recv(100):
                received += chunk
        except (TimeoutError, OSError):
            pass
        console.close()
    after = termios.tcgetattr(slave)
    ours.close()
    os.close(master)
    os.close(slave)
    return received, during, before, after, result["detached"]


def test_interactive_console_sends_keys_raw_detaches_on_ctrl_bracket_and_restores_the_terminal():
    import termios

    received, during, before, after, detached = _terminal_session(b"ls\x03\r\x1d never sent", b"guest says\r\n")
    assert detached is True
    assert received == b"ls\x03\r"  # Ctrl-C and the rest reach the guest as typed; nothing after Ctrl-]
    assert during["shown"] == b"guest says\r\n"
    assert not during["settings"][3] & (termios.ECHO | termios.ICANON | termios.ISIG)
    assert after == before


def test_interactive_console_ends_undetached_when_the_console_hangs_up_and_restores_the_terminal():
    _, _, before, after, detached = _terminal_session(b"", hang_up=True)
    assert detached is False and after == before
