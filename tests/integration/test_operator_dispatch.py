"""A MicroVM applied with kubectl is placed, gets an address block, and leads to exactly one
reference-only message on its node's queue; `kubectl get mvm -o wide` tells the story."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path

import kubernetes
import redis
import yaml
from harness import operator_proc
from harness.fake_worker import message_has_no_spec
from harness.procs import holds_for, wait_for
from harness.scrape import scrape
from harness import binaries
from harness.serviceaccounts import OPERATOR

from mikrom import names

REPO = Path(__file__).resolve().parents[2]


def test_applied_example_sends_exactly_one_reference_only_message_to_its_node(mikrom_cluster, operators, worker,
                                                                              mvms, broker_url):
    mikrom_cluster.kubectl("apply", "-f", str(REPO / "examples/ippool-default.yaml"))
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=4, memory_mib=4096)
    op = operators()

    mikrom_cluster.kubectl("apply", "-n", mvms.ns, "-f", str(REPO / "examples/microvm.yaml"))
    vm = wait_for(lambda: mvms.get("hello") if mvms.status("hello").get("phase") == "Running" else None, 30,
                  "the example VM to run")
    uid = vm["metadata"]["uid"]
    holds_for(lambda: len(worker.messages()) == 1, 2, "a single message (room for a duplicate to show up)")

    msgs = worker.messages(uid=uid)
    assert [m.task for m in msgs] == [names.CREATE_VM], msgs
    m = msgs[0]
    assert m.node == node and m.headers["task"] == names.CREATE_VM
    assert m.kwargs == {"namespace": mvms.ns, "name": "hello", "uid": uid, "intent": "create"}
    assert message_has_no_spec(m.raw), m.raw
    assert message_has_no_spec(json.dumps(m.headers)), m.headers
    assert len(worker.messages()) == 1
    with redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5) as r:
        assert r.llen(names.DEFAULT_QUEUE) == 0  # nothing went to the shared queue instead

    status = vm["status"]
    assert status["node"] == node
    assert status["dispatch"]["intent"] == "create" and status["dispatch"]["taskId"] == m.headers["id"]
    scheduled = next(c for c in status["conditions"] if c["type"] == names.SCHEDULED)
    assert scheduled["status"] == "True" and scheduled["reason"] == names.PLACED

    # the node got a block from the default pool, and the VM an address inside it
    node_obj = mvms.node(node)
    assert node_obj["spec"]["pool"] == "default"
    assert ipaddress.ip_address(status["ipAddress"]) in ipaddress.ip_network(node_obj["spec"]["cidr"])

    wide = mikrom_cluster.kubectl("get", "mvm", "-n", mvms.ns, "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "PHASE", "NODE", "IP", "VCPUS", "MEMORY", "AGE", "VMM", "READY"]
    row = wide[1].split()
    assert row[:6] == ["hello", "Running", node, status["ipAddress"], "1", "256"], wide
    assert row[7:] == ["qemu", "True"], wide

    scheduled = mvms.wait_events(uid, names.SCHEDULED)[0]
    assert scheduled.message == f"assigned to MicroVMNode {node}; sent create_vm_task to queue mikrom.node.{node} " \
                                "(attempt 1)"
    assert [e.reason for e in mvms.events(uid)] == [names.SCHEDULED]  # one Event for one transition
    sent = [d for d in op.dispatches() if d["vm_uid"] == uid]
    assert [(d["intent"], d["why"], d["redispatch"]) for d in sent] == [("create", "new", False)]

    # the operator's Prometheus endpoint counts the send and shows the VM and its node
    samples = scrape(f"http://127.0.0.1:{op.metrics_port}/metrics")
    assert samples['mikrom_operator_dispatches_total{intent="create",why="new"}'] == 1
    assert samples['mikrom_microvms{phase="Running"}'] == 1
    assert samples['mikrom_microvmnodes{ready="True"}'] >= 1
    assert samples.get('mikrom_operator_dispatch_failures_total{intent="create"}', 0) == 0


def test_node_and_pool_status_show_what_the_vms_hold(mikrom_cluster, operators, worker, mvms):
    mikrom_cluster.kubectl("apply", "-f", str(REPO / "examples/ippool-default.yaml"))
    node = f"kvm-{mvms.label}"
    worker.add_node(node, vcpus=8, memory_mib=4096, labels={"test": mvms.label})
    operators()
    for i in range(3):
        mvms.create(f"vm-{i}", vcpus=2, memoryMiB=512, network={"pool": "default"},
                    nodeSelector={"test": mvms.label})
    for i in range(3):
        mvms.wait_phase(f"vm-{i}", "Running")

    def node_counts():
        st = (mvms.node(node) or {}).get("status") or {}
        return st if st.get("vmCount") == 3 else None

    st = wait_for(node_counts, 15, "the node's counts")
    assert st["allocated"] == {"vcpus": 6, "memoryMiB": 1536}
    assert st["usage"] == {"vcpus": "6/8", "memoryMiB": "1536/4096"}
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "True"
    row = mikrom_cluster.kubectl("get", "mvmn", node).stdout.splitlines()[1].split()
    assert row[:6] == [node, "True", "3", "6/8", "1536/4096", (mvms.node(node))["spec"]["cidr"]]

    block = mvms.node(node)["spec"]["cidr"]

    def pool_counts():
        st = (mvms.pool("default") or {}).get("status") or {}
        return st if st.get("blocks", {}).get(node) and st.get("allocated") == 3 else None

    pool = wait_for(pool_counts, 15, "the pool to list the node's block and count the 3 addresses")
    assert pool["blocks"][node] == block
    assert pool["available"] == 1024 * 61 - pool["allocated"]
    assert yaml.safe_load(mikrom_cluster.kubectl("get", "mippool", "default", "-o", "yaml").stdout)["status"] == pool


def test_operator_runs_as_its_service_account_with_only_the_rights_it_needs(mikrom_cluster, operator_kubeconfig):
    who = subprocess.run([str(binaries.require("kubectl")), "--kubeconfig", str(operator_kubeconfig), "auth",
                          "whoami", "-o", "jsonpath={.status.userInfo.username}"], capture_output=True, text=True,
                         timeout=60)
    assert who.stdout == OPERATOR.user == "system:serviceaccount:mikrom-system:mikrom-operator", who.stderr

    for allowed in (("watch", "microvms.mikrom.io", "-A"), ("patch", "microvms.mikrom.io/status", "-n", "x"),
                    ("patch", "microvmnodes.mikrom.io"), ("patch", "ippools.mikrom.io/status"),
                    ("create", "events", "-n", "x"), ("create", "clusterkopfpeerings.kopf.dev")):
        assert OPERATOR.can(mikrom_cluster, *allowed), allowed
    for denied in (("get", "secrets", "-n", "x"), ("list", "pods", "-A"), ("create", "microvms.mikrom.io", "-n", "x"),
                   ("delete", "microvms.mikrom.io", "-n", "x"), ("delete", "microvmnodes.mikrom.io"),
                   ("create", "ippools.mikrom.io"), ("update", "customresourcedefinitions"),
                   ("create", "serviceaccounts/token", "-n", "mikrom-system")):
        assert not OPERATOR.can(mikrom_cluster, *denied), denied


def test_a_new_vms_message_follows_its_status_write_and_kopf_adds_the_finalizer_after(operators, worker, mvms,
                                                                                      broker_url):
    node = f"one-{mvms.label}"
    worker.add_node(node, answering=False)
    operators()
    mvms.create("vm")
    uid = mvms.uid("vm")
    msg = wait_for(lambda: next(iter(worker.messages(uid=uid)), None), 15, "the create message")
    task_id = msg.headers["id"]

    # the finalizer is kopf's patch after the send (docs/protocol.md, Dispatch); it comes all the same
    def finalized() -> dict | None:
        vm = mvms.get("vm")
        return vm if names.FINALIZER in (vm["metadata"].get("finalizers") or []) else None

    vm = wait_for(finalized, 15, "kopf's finalizer on the VM")
    assert vm["status"]["node"] == node and vm["status"]["dispatch"]["taskId"] == task_id

    # kopf keeps its diff base in memory, so it writes no annotation after its handlers ran
    def diff_base() -> list[str]:
        return [k for k in (mvms.get("vm")["metadata"].get("annotations") or {}) if "last-handled" in k]

    holds_for(lambda: diff_base() == [], 2, "no diff-base annotation (room for one to show up)")
    # and the message went out without a subscription to its result, which the operator never reads
    with redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5) as r:
        assert r.pubsub_numsub(f"celery-task-meta-{task_id}") == [(f"celery-task-meta-{task_id}".encode(), 0)]
    assert [m.task for m in worker.messages(uid=uid)] == [names.CREATE_VM]


def _hold_placements(mikrom_cluster, namespace: str, name: str) -> str:
    """An admission policy refusing, in `namespace`, every status write that sets `status.node`:
    the operator's placement write fails for as long as it is bound."""
    policy = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
              "metadata": {"name": name},
              "spec": {"failurePolicy": "Fail",
                       "matchConstraints": {"resourceRules": [{"apiGroups": [names.GROUP], "apiVersions": ["*"],
                                                               "operations": ["UPDATE"],
                                                               "resources": ["microvms/status"]}]},
                       "validations": [{"expression": "!has(object.status) || !has(object.status.node)",
                                        "message": "placements held by the test"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name},
               "spec": {"policyName": name, "validationActions": ["Deny"],
                        "matchResources": {"namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": namespace}}}}}
    mikrom_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([policy, binding]))
    return name


def _placement_refused(mvms, probe: str) -> bool:
    """Whether a status write setting `status.node` on MicroVM `probe` is refused now (dry run)."""
    try:
        mvms.api.patch_namespaced_custom_object_status(names.GROUP, names.VERSION, mvms.ns, names.MICROVMS, probe,
                                                       {"status": {"node": "nowhere"}}, dry_run="All",
                                                       _request_timeout=30)
    except kubernetes.client.ApiException as exc:
        return "placements held by the test" in (exc.body or "")
    return False


def test_a_new_vms_create_is_sent_before_its_placement_is_recorded_and_not_again_when_the_write_fails(
        mikrom_cluster, operator_kubeconfig, broker_url, namespace, worker, mvms, artifacts_dir):
    # The operator's placement writes are refused (an admission policy) until the test lifts it:
    # the create is on the node's queue while the object names no node, and the decisions again
    # that follow the failed writes send nothing more; once writes pass, the placement recorded is
    # the one the message went to, with its taskId. (Handler errors are expected here, so this
    # operator is not the `operators` fixture's, which fails a test on any traceback.)
    node = f"first-{mvms.label}"
    worker.add_node(node, answering=False)
    mvms.create("probe", nodeSelector={"nowhere": mvms.label})  # never placed: the policy's probe
    policy = _hold_placements(mikrom_cluster, namespace, f"hold-{mvms.label}")
    try:
        wait_for(lambda: _placement_refused(mvms, "probe"), 30, "the admission policy to be in force")
        op = operator_proc.start(mikrom_cluster, broker_url, artifacts_dir / "operators", f"{namespace}-sendfirst",
                                 operator_kubeconfig, namespace=namespace)
        try:
            op.wait_live()
            mvms.create("vm")
            uid = mvms.uid("vm")
            msg = wait_for(lambda: next(iter(worker.messages(uid=uid)), None), 15, "the create message")
            assert not mvms.status("vm").get("node")  # sent, not recorded

            def refused_writes() -> int:
                return sum("placement of" in line and "placements held by the test" in line for line in op.lines())

            # the failed write is decided again (a change to the object is a raw event, which places it)
            wait_for(lambda: refused_writes() >= 1, 15, "the operator's placement write to be refused")
            mvms.patch("vm", {"metadata": {"annotations": {"test.mikrom.io/nudge": "1"}}})
            wait_for(lambda: refused_writes() >= 2, 15, "a decision again, its write refused too")
            holds_for(lambda: len(worker.messages(uid=uid)) == 1 and not mvms.status("vm").get("node"), 2,
                      "one message while the placement write keeps failing")
            mikrom_cluster.kubectl("delete", "validatingadmissionpolicybinding", policy)
            wait_for(lambda: not _placement_refused(mvms, "probe"), 30, "the admission policy to be lifted")
            mvms.patch("vm", {"metadata": {"annotations": {"test.mikrom.io/nudge": "2"}}})
            status = wait_for(lambda: (st := mvms.status("vm")).get("node") and st, 20, "the placement recorded")
            assert status["node"] == node and status["dispatch"]["taskId"] == msg.headers["id"]
            assert status["phase"] == "Scheduled"
            holds_for(lambda: len(worker.messages(uid=uid)) == 1, 3, "still one message once recorded")
            sent = [d for d in op.dispatches() if d["vm_uid"] == uid]
            assert [(d["intent"], d["why"], d["task_id"]) for d in sent] == [("create", "new", msg.headers["id"])]
        finally:
            op.stop()
    finally:
        mikrom_cluster.kubectl("delete", "validatingadmissionpolicybinding", policy, "--ignore-not-found")
        mikrom_cluster.kubectl("delete", "validatingadmissionpolicy", policy, "--ignore-not-found")
        mvms.remove_all()
