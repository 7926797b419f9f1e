"""A table of invalid manifests: each one is refused by the API server (schema, CEL rules) or marked
InvalidSpec by the operator, and every message names the offending field. The operator stays up
throughout, retries nothing in a loop, and logs no unhandled exception."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from harness.procs import holds_for, wait_for
from mikrom import names

REPO = Path(__file__).resolve().parents[2]
SHA = "a" * 64


def _vm(name: str, **spec) -> dict:
    body = {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name},
            "spec": {"vcpus": 1, "memoryMiB": 256,
                     "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}
    for key, value in spec.items():
        if value is None:
            body["spec"].pop(key, None)
        else:
            body["spec"][key] = value
    return body


def _image(**parts) -> dict:
    image = {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}
    for key, value in parts.items():
        if value is None:
            image.pop(key, None)
        else:
            image[key] = value
    return image


# (case, manifest, field the refusal must name): the API server refuses these on create
REFUSED = [
    ("zero vcpus", _vm("r01", vcpus=0), "spec.vcpus"),
    ("too many vcpus", _vm("r02", vcpus=33), "spec.vcpus"),
    ("vcpus not a number", _vm("r03", vcpus="two"), "spec.vcpus"),
    ("too little memory", _vm("r04", memoryMiB=64), "spec.memoryMiB"),
    ("too much memory", _vm("r05", memoryMiB=70000), "spec.memoryMiB"),
    ("unknown runStrategy", _vm("r06", runStrategy="Sometimes"), "spec.runStrategy"),
    ("unknown vmm", _vm("r07", vmm="xen"), "spec.vmm"),
    ("no image", _vm("r08", image=None), "spec.image"),
    ("no kernel", _vm("r09", image=_image(kernel=None)), "spec.image.kernel"),
    ("kernel with url and path", _vm("r10", image=_image(kernel={"path": "k", "url": "https://x/k", "sha256": SHA})),
     "spec.image.kernel"),
    ("kernel with neither url nor path", _vm("r11", image=_image(kernel={"sha256": SHA})), "spec.image.kernel"),
    ("kernel url without sha256", _vm("r12", image=_image(kernel={"url": "https://example.com/vmlinux"})),
     "spec.image.kernel.sha256"),
    ("rootfs url without sha256", _vm("r13", image=_image(rootfs={"url": "https://example.com/rootfs.ext4"})),
     "spec.image.rootfs.sha256"),
    ("absolute kernel path", _vm("r14", image=_image(kernel={"path": "/etc/passwd"})), "spec.image.kernel.path"),
    ("kernel path climbing out", _vm("r15", image=_image(kernel={"path": "../../etc/shadow"})),
     "spec.image.kernel.path"),
    ("initrd path climbing out midway", _vm("r16", image=_image(initrd={"path": "a/../../b"})),
     "spec.image.initrd.path"),
    ("rootfs path climbing out at the end", _vm("r17", image=_image(rootfs={"path": "images/.."})),
     "spec.image.rootfs.path"),
    ("sha256 not hex", _vm("r18", image=_image(kernel={"url": "https://x/k", "sha256": "xyz"})),
     "spec.image.kernel.sha256"),
    ("url with an unsupported scheme", _vm("r19", image=_image(kernel={"url": "ftp://x/k", "sha256": SHA})),
     "spec.image.kernel.url"),
    ("neither rootfs nor initrd", _vm("r20", image={"kernel": {"path": "vmlinuz"}}), "spec.image"),
    ("unknown field", _vm("r21", cpus=2), "spec.cpus"),
    ("nodeName not a DNS name", _vm("r22", nodeName="Bad_Name"), "spec.nodeName"),
    ("pool not a DNS name", _vm("r23", network={"pool": "UPPER"}), "spec.network.pool"),
    ("kernelArgs too long", _vm("r24", image={**_image(), "kernelArgs": "x" * 5000}), "spec.image.kernelArgs"),
    ("negative ttl", _vm("r25", ttlSecondsAfterFinished=-1), "spec.ttlSecondsAfterFinished"),
    ("nodeSelector value not a string", _vm("r26", nodeSelector={"tier": 1}), "spec.nodeSelector"),
    ("empty kernel path", _vm("r27", image=_image(kernel={"path": ""})), "spec.image.kernel.path"),
    ("no spec at all", {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": "r28"}}, "spec"),
]


def test_every_invalid_manifest_is_refused_or_marked_invalid_naming_the_field(mikrom_cluster, operators, worker,
                                                                             mvms):
    cp = mikrom_cluster
    cp.kubectl("apply", "-f", str(REPO / "examples/ippool-default.yaml"))
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=8, labels={"test": mvms.label, "tier": "gold"})
    op = operators()
    failures: list[str] = []

    def refused(case: str, body, field: str, *args: str) -> None:
        res = cp.kubectl(*(args or ("apply", "-n", mvms.ns, "-f", "-")), input=yaml.safe_dump(body) if body else None,
                         check=False)
        if res.returncode == 0:
            failures.append(f"{case}: accepted")
        elif field not in res.stderr:
            failures.append(f"{case}: refused without naming {field}: {res.stderr.strip()}")

    for case, body, field in REFUSED:
        refused(case, body, field)

    # the operator's checks: what only the rest of the cluster can tell
    invalid = [
        ("unknown pool", _vm("o1", network={"pool": f"nonexistent-{mvms.label}"}), "spec.network.pool"),
    ]
    for case, body, _ in invalid:
        cp.kubectl("apply", "-n", mvms.ns, "-f", "-", input=yaml.safe_dump(body))
    for case, body, field in invalid:
        name = body["metadata"]["name"]
        try:
            st = wait_for(lambda: mvms.status(name) if mvms.status(name).get("reason") == names.INVALID_SPEC else None,
                          15, f"{name} to be InvalidSpec")
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
            continue
        cond = mvms.condition(name, names.SCHEDULED)
        if st["phase"] != "Failed" or field not in st["message"] or cond.get("reason") != names.INVALID_SPEC \
                or field not in cond.get("message", ""):
            failures.append(f"{case}: status does not name {field}: {st}")
        try:
            warning = mvms.wait_events(mvms.get(name)["metadata"]["uid"], names.INVALID_SPEC)[0]
        except AssertionError as exc:
            failures.append(f"{case}: {exc}")
            continue
        if warning.type != "Warning" or field not in warning.message:
            failures.append(f"{case}: the Event does not name {field}: {warning.message}")

    # updates the API server refuses: immutable fields of a VM, a pool and a node
    base = _vm("base", nodeName=node, network={"pool": "default"})
    cp.kubectl("apply", "-n", mvms.ns, "-f", "-", input=yaml.safe_dump(base))
    mvms.wait_phase("base", "Running")
    for case, change, field in [
        ("nodeName changed", {"nodeName": f"other-{mvms.label}"}, "spec.nodeName"),
        ("nodeName removed", {"nodeName": None}, "spec.nodeName"),
        ("network removed", {"network": None}, "spec.network"),
        ("pool changed", {"network": {"pool": "other"}}, "spec.network"),
    ]:
        body = copy.deepcopy(base)
        for key, value in change.items():
            if value is None:
                body["spec"].pop(key)
            else:
                body["spec"][key] = value
        refused(case, body, field)
    pool = yaml.safe_load((REPO / "examples/ippool-default.yaml").read_text())
    refused("pool cidr changed", {**pool, "spec": {**pool["spec"], "cidr": "10.9.0.0/16"}}, "spec.cidr",
            "apply", "-f", "-")
    refused("pool blockSize changed", {**pool, "spec": {**pool["spec"], "blockSize": 24}}, "spec.blockSize",
            "apply", "-f", "-")
    bad_pool = {"apiVersion": names.API_VERSION, "kind": "IPPool", "metadata": {"name": f"bad-{mvms.label}"}}
    refused("pool cidr not a CIDR", {**bad_pool, "spec": {"cidr": "10.0.0.0/33"}}, "spec.cidr", "apply", "-f", "-")
    refused("pool blocks too large", {**bad_pool, "spec": {"cidr": "10.0.0.0/8", "blockSize": 8}}, "spec.blockSize",
            "apply", "-f", "-")
    refused("node block changed", None, "spec.cidr", "patch", "mvmn", node, "--type=merge",
            "-p", '{"spec": {"cidr": "10.99.0.0/26"}}')

    checked = len(REFUSED) + len(invalid) + 4 + 5
    assert checked >= 30
    assert not failures, "\n".join(failures)

    # no retry loop: the invalid VMs' status stays as it is and each has exactly one Event
    before = {b["metadata"]["name"]: mvms.get(b["metadata"]["name"])["metadata"]["resourceVersion"]
              for _, b, _ in invalid}
    holds_for(lambda: {n: mvms.get(n)["metadata"]["resourceVersion"] for n in before} == before, 3,
              "the invalid VMs to stay unchanged")
    for name in before:
        events = [e for e in mvms.events(mvms.get(name)["metadata"]["uid"]) if e.reason == names.INVALID_SPEC]
        assert len(events) == 1, (name, [e.message for e in events])
    assert op.alive()
    assert not op.problems(), op.problems()
