"""Guest addresses inside the node's block: gateway first, lowest free next, the old one kept."""

import pytest

from mikrom.worker import ipalloc


def test_the_gateway_is_the_blocks_first_host_with_its_prefix():
    assert str(ipalloc.gateway("10.1.2.64/26")) == "10.1.2.65/26"


def test_the_first_guest_gets_the_address_after_the_gateway():
    assert ipalloc.pick("10.1.2.64/26", []) == "10.1.2.66"


def test_the_lowest_free_address_fills_gaps():
    assert ipalloc.pick("10.1.2.0/29", ["10.1.2.2", "10.1.2.4"]) == "10.1.2.3"


def test_a_vm_keeps_its_previous_address_when_it_is_free():
    assert ipalloc.pick("10.1.2.0/29", ["10.1.2.2"], preferred="10.1.2.5") == "10.1.2.5"


@pytest.mark.parametrize("preferred", ["10.1.2.2", "10.1.2.1", "10.1.2.0", "10.1.2.7", "10.9.9.9", "nonsense"])
def test_a_preferred_address_that_is_taken_or_not_a_guest_address_is_not_used(preferred):
    got = ipalloc.pick("10.1.2.0/29", ["10.1.2.2"], preferred=preferred)
    assert got == "10.1.2.3"


def test_a_full_block_is_reported_as_exhausted():
    with pytest.raises(ipalloc.BlockExhausted) as err:
        ipalloc.pick("10.1.2.0/30", ["10.1.2.2"])
    assert err.value.reason == "AddressesExhausted"


def test_a_node_without_a_block_says_so():
    with pytest.raises(ipalloc.NoAddressBlock):
        ipalloc.pick("", [])
