"""The operator's own checks of a MicroVM spec, each naming the offending field."""

import pytest

from mikrom.operator import validation

POOLS = {"default": {}}
NODES = {"kvm-1": {"metadata": {"labels": {"zone": "a", "gpu": "no"}}}, "kvm-2": {"metadata": {"labels": {"zone": "b"}}}}


def spec(**kw):
    base = {"vcpus": 1, "memoryMiB": 256, "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}
    base.update(kw)
    return base


def fields(s, pools=POOLS, nodes=NODES):
    return [p.field for p in validation.validate(s, pools, nodes)]


def test_valid_spec_has_no_problems():
    assert validation.validate(spec(network={"pool": "default"}, nodeSelector={"zone": "a"}), POOLS, NODES) == []


def test_unknown_pool_names_the_pool_field():
    problems = validation.validate(spec(network={"pool": "nope"}), POOLS, NODES)
    assert [str(p) for p in problems] == ["spec.network.pool: IPPool 'nope' does not exist"]


def test_network_without_pool_means_the_default_pool():
    assert fields(spec(network={}), pools={}) == ["spec.network.pool"]
    assert fields(spec(network={})) == []


def test_node_name_and_node_selector_are_left_to_placement_not_rejected():
    # a nodeName with no MicroVMNode yet, or a nodeSelector no node matches, waits Pending like a Pod's
    assert fields(spec(nodeName="ghost")) == []
    assert fields(spec(nodeSelector={"zone": "c"})) == []
    assert fields(spec(nodeName="kvm-2", nodeSelector={"zone": "a"})) == []


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../b", "a/..", "..", "a\\..\\b", "a\x00b", ""])
def test_image_path_escaping_the_image_directory(path):
    assert fields(spec(image={"kernel": {"path": path}, "initrd": {"path": "i"}})) == ["spec.image.kernel.path"]


@pytest.mark.parametrize("path", ["vmlinuz", "sub/dir/vmlinuz", "a..b", "..hidden", "./vmlinuz"])
def test_image_paths_inside_the_directory_are_fine(path):
    assert fields(spec(image={"kernel": {"path": path}, "initrd": {"path": "i"}})) == []


def test_url_without_sha256_names_the_sha256_field():
    s = spec(image={"kernel": {"path": "k"}, "rootfs": {"url": "https://example.com/root.ext4"}})
    assert fields(s) == ["spec.image.rootfs.sha256"]


def test_url_and_path_together_or_neither():
    both = spec(image={"kernel": {"path": "k", "url": "https://x/k", "sha256": "a" * 64}, "initrd": {"path": "i"}})
    assert fields(both) == ["spec.image.kernel"]
    neither = spec(image={"kernel": {}, "initrd": {"path": "i"}})
    assert "spec.image.kernel" in fields(neither)


def test_missing_kernel_and_missing_root_are_named():
    assert fields(spec(image={"initrd": {"path": "i"}})) == ["spec.image.kernel"]
    assert fields(spec(image={"kernel": {"path": "k"}})) == ["spec.image"]


def test_schema_checks_apply_too_when_the_api_server_did_not():
    assert fields(spec(vcpus=64)) == ["spec.vcpus"]
    assert fields(spec(runStrategy="Sometimes")) == ["spec.runStrategy"]
    assert fields(spec(cpus=2)) == ["spec.cpus"]


def test_every_problem_is_reported_at_once():
    s = spec(network={"pool": "nope"}, vcpus=64, image={"kernel": {"path": "/abs"}, "initrd": {"path": "i"}})
    assert set(fields(s)) == {"spec.network.pool", "spec.vcpus", "spec.image.kernel.path"}
    assert validation.describe(validation.validate(s, POOLS, NODES)).count("; ") == 2
