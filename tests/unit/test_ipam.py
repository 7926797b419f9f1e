"""Address blocks: carving a pool into per-node blocks, and the pool's counts."""

from mikrom.operator import ipam


def test_blocks_are_carved_lowest_first_and_never_overlap():
    taken = []
    for _ in range(4):
        taken.append(ipam.next_block("10.0.0.0/24", 26, taken))
    assert taken == ["10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26", "10.0.0.192/26"]
    assert ipam.next_block("10.0.0.0/24", 26, taken) is None


def test_a_freed_block_is_reused():
    assert ipam.next_block("10.0.0.0/24", 26, ["10.0.0.0/26", "10.0.0.128/26"]) == "10.0.0.64/26"


def test_blocks_of_other_sizes_and_outside_the_pool_are_respected():
    # a /25 taken (e.g. carved before) covers two /26 candidates; a block elsewhere changes nothing
    assert ipam.next_block("10.0.0.0/24", 26, ["10.0.0.0/25", "192.168.0.0/26"]) == "10.0.0.128/26"
    assert ipam.next_block("10.0.0.0/24", 26, ["10.0.0.64/27"]) == "10.0.0.0/26"
    assert ipam.next_block("10.0.0.0/24", 26, ["10.0.0.32/27"]) == "10.0.0.64/26"


def test_pool_with_host_bits_set_is_read_as_its_network():
    assert ipam.next_block("10.0.0.7/24", 25, []) == "10.0.0.0/25"


def test_block_larger_than_the_pool_gives_nothing():
    assert ipam.next_block("10.0.0.0/24", 20, []) is None
    assert ipam.total_blocks("10.0.0.0/24", 20) == 0


def test_guest_addresses_per_block_exclude_network_gateway_and_broadcast():
    assert ipam.guests_per_block(26) == 61
    assert ipam.guests_per_block(30) == 1
    assert ipam.guests_per_block(16) == 65533


def test_large_pool_finds_a_block_quickly():
    assert ipam.next_block("10.0.0.0/8", 30, []) == "10.0.0.0/30"
    many = [f"10.0.{i}.0/24" for i in range(200)]
    assert ipam.next_block("10.0.0.0/16", 24, many) == "10.0.200.0/24"


def test_pool_status_counts_blocks_and_addresses_held_inside_them():
    blocks = {"node-b": "10.0.0.64/26", "node-a": "10.0.0.0/26"}
    st = ipam.pool_status("10.0.0.0/24", 26, blocks, ["10.0.0.2", "10.0.0.66", "192.168.1.1"])
    assert st == {"blocks": {"node-a": "10.0.0.0/26", "node-b": "10.0.0.64/26"}, "blockCount": 2, "allocated": 2,
                  "available": 4 * 61 - 2, "message": ""}


def test_pool_status_says_when_every_block_is_carved():
    st = ipam.pool_status("10.0.0.0/25", 26, {"a": "10.0.0.0/26", "b": "10.0.0.64/26"}, [])
    assert "every block of 10.0.0.0/25 is carved" in st["message"]
    assert "larger than the pool" in ipam.pool_status("10.0.0.0/24", 20, {}, [])["message"]


def test_contains_rejects_garbage():
    assert ipam.contains("10.0.0.0/26", "10.0.0.5")
    assert not ipam.contains("10.0.0.0/26", "10.0.0.64")
    assert not ipam.contains("10.0.0.0/26", "not-an-ip")
