"""Placement: least allocated first, every filter, and a message that says what is short."""

from mikrom.operator import placement
from mikrom.operator.placement import NodeView, Request


def node(name, cpu=4, mem=8192, used_cpu=0, used_mem=0, **kw) -> NodeView:
    kw.setdefault("ready", True)
    kw.setdefault("vmms", ("qemu", "firecracker"))
    return NodeView(name=name, capacity_vcpus=cpu, capacity_memory_mib=mem, allocated_vcpus=used_cpu,
                    allocated_memory_mib=used_mem, **kw)


def test_least_allocated_node_wins():
    choice = placement.choose(Request(2, 512), [node("a", used_cpu=2), node("b", used_cpu=1), node("c", used_cpu=3)])
    assert choice.node == "b"


def test_tie_is_broken_by_name_so_placement_is_deterministic():
    assert placement.choose(Request(1, 256), [node("b"), node("a")]).node == "a"


def test_memory_counts_as_much_as_vcpus():
    # a: cpu 25%, mem 90%; b: cpu 50%, mem 10% -> b is less allocated overall
    a = node("a", cpu=8, mem=1000, used_cpu=1, used_mem=900)
    b = node("b", cpu=8, mem=1000, used_cpu=3, used_mem=0)
    assert placement.choose(Request(1, 50), [a, b]).node == "b"


def test_two_four_vcpu_nodes_take_exactly_four_two_vcpu_vms_two_each():
    used = {"a": 0, "b": 0}
    placed = []
    for _ in range(6):
        views = [node(n, used_cpu=u) for n, u in used.items()]
        choice = placement.choose(Request(2, 256), views)
        placed.append(choice.node)
        if choice.node:
            used[choice.node] += 2
    assert placed == ["a", "b", "a", "b", None, None]


def test_no_fit_names_what_is_short_on_each_node():
    choice = placement.choose(Request(2, 512), [node("a", used_cpu=4), node("b", used_cpu=3)])
    assert choice.node is None
    assert choice.message == ("0/2 MicroVMNodes can take 2 vCPU, 512 MiB: a: too few free vCPUs (0 of 4 free); "
                              "b: too few free vCPUs (1 of 4 free)")


def test_memory_shortage_is_reported_as_memory():
    choice = placement.choose(Request(1, 4096), [node("a", mem=8192, used_mem=6144)])
    assert "too little free memory (2048 of 8192 MiB free)" in choice.message


def test_not_ready_and_cordoned_nodes_are_skipped_with_their_reason():
    choice = placement.choose(Request(1, 128), [node("a", ready=False), node("b", schedulable=False)])
    assert choice.node is None
    assert "a: not Ready" in choice.message and "b: cordoned" in choice.message


def test_node_selector_and_node_name_filter_before_capacity():
    nodes = [node("a", labels={"zone": "x"}), node("b", labels={"zone": "y"}, used_cpu=1)]
    assert placement.choose(Request(1, 128, node_selector={"zone": "y"}), nodes).node == "b"
    assert placement.choose(Request(1, 128, node_name="b"), nodes).node == "b"
    none = placement.choose(Request(1, 128, node_selector={"zone": "z"}), nodes)
    assert none.node is None and "no MicroVMNode matches spec.nodeSelector {zone=z} (2 registered)" in none.message
    pinned = placement.choose(Request(8, 128, node_name="a"), nodes)
    assert "1 not matching spec.nodeName" in pinned.message and "a: too few free vCPUs" in pinned.message


def test_requested_vmm_must_be_offered():
    choice = placement.choose(Request(1, 128, vmm="firecracker"), [node("a", vmms=("qemu",)), node("b")])
    assert choice.node == "b"
    assert "a: no firecracker" in placement.choose(Request(1, 128, vmm="firecracker"), [node("a", vmms=("qemu",))]).message


def test_networked_vm_needs_a_block_from_its_pool_or_one_to_carve():
    with_block = node("a", pool="default", free_addresses=3)
    other_pool = node("b", pool="other", free_addresses=10)
    full = node("c", pool="default", free_addresses=0)
    no_block = node("d", can_carve=True)
    assert placement.choose(Request(1, 128, pool="default"), [with_block, other_pool, full]).node == "a"
    choice = placement.choose(Request(1, 128, pool="default"), [other_pool, full, no_block])
    assert choice.node == "d" and choice.needs_block
    none = placement.choose(Request(1, 128, pool="default"), [other_pool, full, node("e", can_carve=False)])
    assert none.node is None
    assert "b: its address block is from IPPool other" in none.message
    assert "c: its address block is full" in none.message
    assert "e: no free address block left in IPPool default" in none.message


def test_vm_without_network_ignores_address_blocks():
    assert placement.choose(Request(1, 128), [node("a", pool="other", free_addresses=0)]).node == "a"


def test_no_node_at_all_says_so():
    assert placement.choose(Request(1, 128), []).message.startswith("no MicroVMNode is registered")


def test_long_lists_are_cut_short():
    nodes = [node(f"n{i:02d}", ready=False) for i in range(12)]
    msg = placement.choose(Request(1, 128), nodes).message
    assert "and 4 more" in msg and "n11" not in msg


def test_request_is_read_from_the_spec_with_its_defaults():
    req = placement.request_of({"vcpus": 2, "memoryMiB": 1024, "network": {}, "nodeSelector": {"a": "b"}})
    assert req == Request(2, 1024, {"a": "b"}, None, "default", None)
    assert placement.request_of({}).pool is None and placement.request_of({}).vcpus == 1


def test_finished_vms_release_capacity_and_the_larger_shape_counts():
    vm = {"spec": {"vcpus": 2, "memoryMiB": 512}, "status": {"node": "a", "phase": "Running",
                                                             "activeShape": {"vcpus": 4, "memoryMiB": 256}}}
    assert placement.holds(vm) and placement.shape(vm) == (4, 512)
    assert not placement.holds({**vm, "status": {"node": "a", "phase": "Succeeded"}})
    assert not placement.holds({**vm, "status": {"phase": "Pending"}})
    assert placement.holds({**vm, "status": {"node": "a", "phase": "Stopped"}})  # it may start again there
