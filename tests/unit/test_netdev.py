"""Names, MAC addresses and the guest's kernel `ip=` argument derived for a VM."""

from __future__ import annotations

import re
import uuid

import pytest
from mikrom.worker import netdev

UIDS = [str(uuid.UUID(int=i * 7919 + 1)) for i in range(2000)]


def test_tap_name_is_deterministic_short_and_prefixed():
    uid = "0b7a4c2e-9d3f-4a51-8c60-2f4d7e1b9a33"
    name = netdev.tap_name_for_uid(uid)
    assert name == netdev.tap_name_for_uid(uid)
    assert len(name) <= 15
    assert re.fullmatch(r"mk[0-9a-f]{12}", name)


def test_tap_names_and_macs_differ_between_vms():
    assert len({netdev.tap_name_for_uid(u) for u in UIDS}) == len(UIDS)
    assert len({netdev.mac_for_uid(u) for u in UIDS}) == len(UIDS)


@pytest.mark.parametrize("uid", UIDS[:200])
def test_mac_is_locally_administered_unicast(uid):
    mac = netdev.mac_for_uid(uid)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
    first = int(mac[:2], 16)
    assert first & 0x02, "locally administered bit must be set"
    assert not first & 0x01, "multicast bit must be clear"
    assert mac == netdev.mac_for_uid(uid)


def test_kernel_ip_arg_uses_the_nfsroot_format():
    assert netdev.kernel_ip_arg("172.16.3.7", "172.16.3.1", 24) == "ip=172.16.3.7::172.16.3.1:255.255.255.0::eth0:off"
    assert netdev.kernel_ip_arg("10.1.2.3", "10.1.0.1", 16, hostname="web-1") == \
        "ip=10.1.2.3::10.1.0.1:255.255.0.0:web-1:eth0:off"


def test_kernel_ip_arg_fields_sit_where_the_kernel_expects_them():
    fields = netdev.kernel_ip_arg("192.168.5.20", "192.168.5.1", 26)[len("ip="):].split(":")
    client, server, gateway, netmask, hostname, device, autoconf = fields
    assert (client, server, gateway, netmask, hostname, device, autoconf) == \
        ("192.168.5.20", "", "192.168.5.1", "255.255.255.192", "", "eth0", "off")


def test_kernel_ip_arg_refuses_a_gateway_outside_the_subnet_and_bad_addresses():
    with pytest.raises(ValueError):
        netdev.kernel_ip_arg("10.0.0.2", "10.0.1.1", 24)
    with pytest.raises(ValueError):
        netdev.kernel_ip_arg("10.0.0.300", "10.0.0.1", 24)
