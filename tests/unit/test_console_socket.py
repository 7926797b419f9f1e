"""The VMM supervisor's interactive console socket, with a small Python program standing in for the
VMM's serial port (it answers each line it reads on stdin): one client relayed both ways, a second
one refused, a client that stops reading never stalls the log, the socket 0600 and gone with the VMM.
The real QEMU guest behind the same socket is tests/e2e/test_console.py."""

from __future__ import annotations

import os
import socket
import stat
import sys
from pathlib import Path

import pytest
from harness.waits import wait_for
from mikrom.worker.vmm import VMSpec, running_pid
from mikrom.worker.vmm.base import Driver
from mikrom.worker.vmm.consolecap import BUSY_MESSAGE, CLIENT_BUFFER_BYTES, CONSOLE_SOCKET, unix_address

SERIAL = r"""
import os, sys
print("MIKROM-READY", flush=True)
for line in sys.stdin:
    line = line.strip()
    if line == "flood":
        for i in range(4096):
            sys.stdout.write(f"{i:08d}" + "x" * 1015 + "\n")  # 4 MiB
        sys.stdout.write("FLOOD-DONE\n")
        sys.stdout.flush()
    else:
        print("serial got " + line, flush=True)
"""


class SerialDriver(Driver):
    name = "serial"

    def available(self):
        return True

    def command(self, spec):
        return [sys.executable, "-I", "-c", SERIAL, f"{Path(spec.state_dir).resolve()}/vmm"]


def make_spec(tmp_path: Path, state_dir: Path, name: str) -> VMSpec:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"k")
    return VMSpec(uid=f"uid-{name}", name=name, vcpus=1, memory_mib=64, kernel=str(kernel), state_dir=state_dir)


@pytest.fixture
def vm(tmp_path):
    driver = SerialDriver(console_max_bytes=64 << 20)
    spec = make_spec(tmp_path, tmp_path / "vm", "console")
    driver.start(spec)
    driver.wait_ready(spec, timeout=20)
    yield spec
    driver.stop(spec.state_dir, timeout=0)


def connect(state_dir: Path) -> socket.socket:
    address, dirfd = unix_address(str(state_dir / CONSOLE_SOCKET))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(address)
    finally:
        if dirfd is not None:
            os.close(dirfd)
    return sock


def read_until(sock: socket.socket, needle: bytes) -> bytes:
    got = b""
    while needle not in got:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def log(spec: VMSpec) -> str:
    return (spec.state_dir / "console.log").read_text(errors="replace")


def test_a_console_client_types_into_the_serial_port_and_reads_what_it_prints_which_the_log_keeps_too(vm):
    path = vm.state_dir / CONSOLE_SOCKET
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    with connect(vm.state_dir) as client:
        client.sendall(b"hello\n")
        assert b"serial got hello" in read_until(client, b"serial got hello")
    assert "serial got hello" in log(vm)
    # detaching leaves the console to the next client
    with connect(vm.state_dir) as again:
        again.sendall(b"again\n")
        assert b"serial got again" in read_until(again, b"serial got again")


def test_a_second_client_is_told_the_console_is_busy_and_the_first_keeps_it(vm):
    with connect(vm.state_dir) as first:
        first.sendall(b"one\n")
        read_until(first, b"serial got one")
        with connect(vm.state_dir) as second:
            assert read_until(second, b"\n\n") == BUSY_MESSAGE  # then closed
        first.sendall(b"two\n")
        assert b"serial got two" in read_until(first, b"serial got two")


def test_a_client_that_stops_reading_never_stalls_the_log_and_misses_only_the_oldest_output(vm):
    with connect(vm.state_dir) as slow:
        slow.sendall(b"flood\n")  # 4 MiB of output; the client reads none of it meanwhile
        wait_for(lambda: "FLOOD-DONE" in log(vm), 30, "the whole flood in console.log")
        assert running_pid(vm.state_dir)
        slow.sendall(b"after\n")
        wait_for(lambda: "serial got after" in log(vm), 10, "the VMM to keep answering")
        got = read_until(slow, b"serial got after")
        assert b"serial got after" in got and b"FLOOD-DONE" in got
        # what it missed is the oldest: kernel socket buffers plus the supervisor's bounded buffer
        assert len(got) < 4 << 20 and len(got) < CLIENT_BUFFER_BYTES + (2 << 20)


def test_the_console_socket_goes_with_the_vmm(tmp_path):
    driver = SerialDriver()
    spec = make_spec(tmp_path, tmp_path / "vm", "gone")
    driver.start(spec)
    driver.wait_ready(spec, timeout=20)
    client = connect(spec.state_dir)
    driver.stop(spec.state_dir, timeout=0)
    assert client.recv(100) == b""  # the supervisor hung up on the client
    client.close()
    assert not (spec.state_dir / CONSOLE_SOCKET).exists()


def test_a_state_dir_too_long_for_a_socket_address_still_gets_its_console(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    driver = SerialDriver()
    spec = make_spec(tmp_path, deep, "deep")
    driver.start(spec)
    try:
        driver.wait_ready(spec, timeout=20)
        assert len(str(deep / CONSOLE_SOCKET)) > 108
        with connect(deep) as client:
            client.sendall(b"deep\n")
            assert b"serial got deep" in read_until(client, b"serial got deep")
    finally:
        driver.stop(spec.state_dir, timeout=0)
