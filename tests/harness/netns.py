"""Network namespaces the tests create (root): the worker's bridge, taps, NAT rules and VMMs live in
one, never on the host's interfaces, and the tests' only traffic goes into them.

Fixtures: `netns` (one namespace, deleted after the test) and `make_netns` (as many as a test needs).
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

PREFIX = "mkt-"
"""Every test namespace's name starts with this (and is short: `ip netns` names become paths)."""


def create(prefix: str = PREFIX) -> str:
    """A new namespace with its loopback up; its name."""
    name = prefix + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
    return name


def delete(name: str) -> None:
    """Remove the namespace (and with it every link inside); nothing if it is gone already."""
    subprocess.run(["ip", "netns", "del", name], timeout=10, capture_output=True)


def run(netns: str, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """`argv` inside the namespace, its output captured."""
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=timeout)


def ping(netns: str, ip: str, count: int = 2) -> subprocess.CompletedProcess:
    """Ping `ip` from inside the namespace (busybox's ping, which hack/test-image.sh installs:
    iputils is not always there)."""
    return run(netns, "busybox", "ping", "-c", str(count), "-W", "3", ip, timeout=30)


def link_exists(netns: str, name: str) -> bool:
    return run(netns, "ip", "link", "show", "dev", name).returncode == 0


@pytest.fixture
def make_netns():
    """A factory of network namespaces; every one is deleted after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(create())
        return made[-1]

    yield make
    for name in made:
        delete(name)


@pytest.fixture
def netns(make_netns) -> str:
    """A network namespace of the test's own, with only loopback in it."""
    return make_netns()
