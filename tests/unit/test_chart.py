"""The Helm chart (charts/mikrom), with the real helm binary and no cluster: it lints and renders
with the default values and with every option set (charts/mikrom/ci/*.yaml), its schema refuses
wrong values naming them, and the rendered manifests have the shape DESIGN.md asks for (security
contexts, probes, no password in any command line, the worker's node placement and privileges,
beat's single replica, the PodDisruptionBudget, RBAC equal to deploy/rbac/, ...). Installing it
on a real cluster is tests/cluster/test_chart_install.py.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from harness import binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mikrom"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
COMPONENTS = {"operator", "worker", "beat", "flower", "redis"}
HOOKS = {"ippool-cleanup"}
"""The component label of the pre-delete hook's resources: never one a workload selects on."""
RELEASE, NAMESPACE = "t", "mikrom-system"
FREE_MAPS = {"settings", "env", "podAnnotations", "podLabels", "nodeSelector", "commonLabels", "annotations",
             "affinity", "requests", "limits", "podSecurityContext", "securityContext"}
"""Values that are maps of the user's own keys (labels, environment, resources, ...)."""


@functools.cache
def helm() -> str:
    return str(binaries.require("helm"))


def run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120, cwd=str(chart.parent))


@functools.cache
def _render(values_files: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> tuple[tuple[str, dict], ...]:
    argv = ["template", RELEASE, str(CHART), "-n", NAMESPACE]
    for f in values_files:
        argv += ["-f", f]
    for s in sets:
        argv += ["--set", s]
    res = run_helm(*argv)
    assert res.returncode == 0, res.stderr
    docs = []
    source = None
    for chunk in re.split(r"^---\s*$", res.stdout, flags=re.M):
        m = re.search(r"^# Source: (\S+)", chunk, flags=re.M)
        if m:
            source = m.group(1)
        doc = yaml.safe_load(chunk)
        if doc:
            docs.append((source, doc))
    return tuple(docs)


def render(*values_files: str | Path, sets: tuple[str, ...] = ()) -> list[dict]:
    return [copy.deepcopy(d) for _, d in _render(tuple(str(f) for f in values_files), sets)]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (
        component is None or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"{len(found)} {kind} of {component}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------ lint and render

@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_the_chart_lints_clean_with_the_default_values_and_with_every_option_set(values):
    res = run_helm("lint", str(CHART), "--strict", *(["-f", str(values)] if values else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[WARNING]" not in res.stdout and "[ERROR]" not in res.stdout, res.stdout


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_template_renders_at_most_one_resource_labelled_with_its_component(values):
    rendered = _render((str(values),) if values else ())
    per_file: dict[str, int] = {}
    for source, doc in rendered:
        per_file[source] = per_file.get(source, 0) + 1
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") and labels.get("app.kubernetes.io/instance") == RELEASE, source
        assert labels.get("helm.sh/chart", "").startswith("mikrom-"), source
        if doc["kind"] not in ("IPPool", "Secret") or "component" in source:
            component = labels.get("app.kubernetes.io/component")
            hook = doc["metadata"].get("annotations", {}).get("helm.sh/hook")
            assert component in (HOOKS if hook else COMPONENTS) or doc["kind"] in ("IPPool", "Secret"), (source, component)
    assert max(per_file.values()) == 1, {k: v for k, v in per_file.items() if v > 1}


def test_the_ci_values_files_set_every_value_of_values_yaml():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    given = [yaml.safe_load(f.read_text()) for f in CI_VALUES]

    def leaves(node, path=()):
        if isinstance(node, dict) and node and path[-1:] != () and path[-1] in FREE_MAPS:
            yield path
        elif isinstance(node, dict) and node:
            for k, v in node.items():
                yield from leaves(v, path + (k,))
        else:
            yield path

    def lookup(doc, path):
        for key in path:
            if not isinstance(doc, dict) or key not in doc:
                return False
            doc = doc[key]
        return True

    missing = [".".join(p) for p in leaves(defaults) if not any(lookup(g, p) for g in given)]
    assert not missing, f"no ci/ values file sets {missing}"


def _values_keys() -> list[tuple[int, str, str]]:
    """(line number, key, the comment line above it) of every mapping key in values.yaml."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_./-]+):", line)
        if not m:
            continue
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#") and not re.match(r"^\s*# \S+ -- ", lines[j]):
            j -= 1  # a description continued over several comment lines
        out.append((i + 1, m.group(2), lines[j].strip() if j >= 0 else ""))
    return out


def test_every_value_is_documented_by_a_comment_starting_with_its_name():
    bad = [f"line {n}: {key}" for n, key, comment in _values_keys() if not comment.startswith(f"# {key} -- ")]
    assert not bad, bad


def test_the_schema_declares_every_value_and_refuses_unknown_ones():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    free_maps = FREE_MAPS
    problems = []

    def walk(values, node, path):
        if node.get("type") == "object" and path[-1:] and path[-1] not in free_maps:
            if node.get("additionalProperties") is not False:
                problems.append(f"{'.'.join(path)} accepts unknown keys")
        for key, value in (values or {}).items():
            sub = node.get("properties", {}).get(key)
            if path and path[-1] in free_maps:
                continue
            if sub is None:
                problems.append(f"{'.'.join(path + (key,))} is not in the schema")
                continue
            if not sub.get("description"):
                problems.append(f"{'.'.join(path + (key,))} has no description in the schema")
            if isinstance(value, dict):
                walk(value, sub, path + (key,))

    assert schema.get("additionalProperties") is False
    walk(defaults, schema, ())
    assert not problems, problems


# Each wrong value, and what the error must name. Secrets are never echoed back.
WRONG = [
    ("operator.replicas=0", "/operator/replicas"),
    ("worker.logFormat=xml", "/worker/logFormat"),
    ("worker.defaultVmm=kvm", "/worker/defaultVmm"),
    ("worker.hostCgroup.parent=../etc", "/worker/hostCgroup/parent"),
    ("worker.stateDir=relative/dir", "/worker/stateDir"),
    ("worker.concurrency=0", "/worker/concurrency"),
    ("worker.updateStrategy.type=Sometimes", "/worker/updateStrategy/type"),
    ("images.worker.digest=sha256:abc", "/images/worker/digest"),
    ("images.operator.pullPolicy=Sometimes", "/images/operator/pullPolicy"),
    ("images.operator.tag=:latest", "/images/operator/tag"),
    ("flower.port=70000", "/flower/port"),
    ("flower.service.type=External", "/flower/service/type"),
    ("flower.basicAuth.username=a:b", "/flower/basicAuth/username"),
    ("ipPool.cidr=10.0.0.0/33", "/ipPool/cidr"),
    ("ipPool.blockSize=31", "/ipPool/blockSize"),
    ("redis.database=16", "/redis/database"),
    ("redis.sentinel.replicas=0", "/redis/sentinel/replicas"),
    ("taskTimeLimit=5", "/taskTimeLimit"),
    ("metrics.port=-1", "/metrics/port"),
    ("settings.REDIS_PASSWORD=x", "REDIS_PASSWORD"),
    ("operatr.replicas=2", "operatr"),
]


@pytest.mark.parametrize("assignment,named", WRONG, ids=[w[0] for w in WRONG])
def test_the_schema_refuses_a_wrong_value_naming_it(assignment, named):
    res = run_helm("template", RELEASE, str(CHART), "--set", assignment)
    assert res.returncode != 0, f"{assignment} was accepted"
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr
    assert named in res.stderr, res.stderr


@pytest.mark.parametrize("path,value", [
    ("externalRedis.url", "redis://:hunter2-secret@redis.example:6379/0"),
    ("flower.basicAuth.password", "hunter2,secret"),
    ("redis.auth.password", "hunter2\nsecret"),
])
def test_a_refused_secret_is_named_but_never_echoed(tmp_path, path, value):
    doc: dict = {}
    node = doc
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(doc))
    res = run_helm("template", RELEASE, str(CHART), "-f", str(values))
    assert res.returncode != 0
    assert "/" + path.replace(".", "/") in res.stderr, res.stderr
    assert "hunter2" not in res.stderr, res.stderr


@pytest.mark.parametrize("sets,message", [
    (("worker.terminationGracePeriodSeconds=300",), "worker.terminationGracePeriodSeconds (300) must be above taskTimeLimit (300)"),
    (("taskSoftTimeLimit=300",), "taskSoftTimeLimit (300) must be below taskTimeLimit (300)"),
    (("redis.enabled=false",), "externalRedis.url is required"),
    (("redis.enabled=false", "externalRedis.url=redis://r:6379/0"), "externalRedis.existingSecret (or externalRedis.password) is required"),
    (("redis.sentinel.enabled=true", "redis.sentinel.replicas=1"), "redis.sentinel.quorum (2) cannot exceed redis.sentinel.replicas (1)"),
    (("serviceAccount.create=false",), "serviceAccount.operatorName and serviceAccount.workerName are required"),
    (("worker.stateDir=/tmp/mikrom",), "worker.stateDir (/tmp/mikrom) must not be under /tmp"),
    (("worker.imageDir=/tmp",), "worker.imageDir (/tmp) must not be under /tmp"),
])
def test_combinations_the_schema_cannot_express_fail_with_a_message_naming_the_values(sets, message):
    argv = ["template", RELEASE, str(CHART)]
    for s in sets:
        argv += ["--set", s]
    res = run_helm(*argv)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


# ------------------------------------------------------------------------------ CRDs and RBAC

def test_the_charts_crds_are_the_top_level_crds_byte_for_byte_plus_kopfs_peering():
    top = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "crds/ is empty"
    for name, data in top.items():
        assert chart.get(name) == data, f"charts/mikrom/crds/{name} differs from crds/{name}: run `make crds`"
    extra = sorted(set(chart) - set(top))
    assert extra == ["kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml"], extra


def test_the_peering_crds_are_the_ones_the_operator_uses():
    from harness.operator_proc import PEERING_CRDS

    for expected in PEERING_CRDS:
        path = CHART / "crds" / f"kopf.dev_{expected['spec']['names']['plural']}.yaml"
        assert yaml.safe_load(path.read_text()) == expected, path.name
    # ... and the ones the operator's RBAC names
    operator_rules = _deploy("deploy/rbac/operator.yaml")["ClusterRole/mikrom-operator"]["rules"]
    (peering,) = [r for r in operator_rules if r["apiGroups"] == ["kopf.dev"]]
    assert sorted(peering["resources"]) == sorted(c["spec"]["names"]["plural"] for c in PEERING_CRDS)


def _rules(doc: dict) -> list:
    return sorted(json.dumps({k: sorted(v) for k, v in rule.items()}, sort_keys=True) for rule in doc["rules"])


def _deploy(path: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all((REPO / path).read_text()) if d}


@pytest.mark.parametrize("kind,deployed,rendered", [
    ("ClusterRole", "mikrom-operator", "t-mikrom-operator"),
    ("ClusterRole", "mikrom-worker", "t-mikrom-worker"),
    ("Role", "mikrom-worker-report", "t-mikrom-worker-report"),
])
def test_the_charts_rbac_rules_are_those_of_deploy_rbac(kind, deployed, rendered):
    plain = {**_deploy("deploy/rbac/operator.yaml"), **_deploy("deploy/rbac/worker.yaml")}[f"{kind}/{deployed}"]
    chart = next(d for d in render() if d["kind"] == kind and d["metadata"]["name"] == rendered)
    assert _rules(chart) == _rules(plain)


def test_rbac_and_service_accounts_can_be_left_out():
    docs = render(sets=("rbac.create=false", "serviceAccount.create=false", "serviceAccount.operatorName=op",
                        "serviceAccount.workerName=wk"))
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                                                   "ServiceAccount")]
    assert pod_spec(one(docs, "Deployment", "operator"))["serviceAccountName"] == "op"
    assert pod_spec(one(docs, "DaemonSet", "worker"))["serviceAccountName"] == "wk"


def test_the_admission_policy_confines_the_workers_service_account_to_its_node():
    docs = render()
    policy = one(docs, "ValidatingAdmissionPolicy")
    binding = one(docs, "ValidatingAdmissionPolicyBinding")
    assert policy["apiVersion"] == binding["apiVersion"] == "admissionregistration.k8s.io/v1"
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (condition,) = policy["spec"]["matchConditions"]
    assert f"system:serviceaccount:{NAMESPACE}:t-mikrom-worker" in condition["expression"]
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert {r for rule in rules for r in rule["resources"]} == {
        "microvmnodes", "microvmnodes/status", "microvms", "microvms/status"}
    assert "authentication.kubernetes.io/node-name" in policy["spec"]["variables"][0]["expression"]


# ------------------------------------------------------------------------------ workloads

def _restricted(container: dict, pod: dict) -> list[str]:
    sc, psc = container.get("securityContext", {}), pod.get("securityContext", {})
    wrong = []
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        wrong.append("runAsNonRoot")
    if sc.get("readOnlyRootFilesystem") is not True:
        wrong.append("readOnlyRootFilesystem")
    if sc.get("allowPrivilegeEscalation") is not False:
        wrong.append("allowPrivilegeEscalation")
    if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
        wrong.append("capabilities")
    if (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        wrong.append("seccompProfile")
    if sc.get("privileged"):
        wrong.append("privileged")
    return wrong


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_pod_but_the_workers_runs_non_root_read_only_without_capabilities(values):
    docs = render(*([values] if values else []))
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = pod_spec(doc)
        for c in containers(spec):
            assert not _restricted(c, spec), (doc["metadata"]["name"], c["name"], _restricted(c, spec))


def test_the_operator_runs_two_peered_replicas_with_probes_on_kopfs_health_endpoint_and_a_pdb():
    docs = render()
    operator = one(docs, "Deployment", "operator")
    assert operator["spec"]["replicas"] == 2
    (c,) = pod_spec(operator)["containers"]
    assert c["command"] == ["mikrom", "operator"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"]
    assert "--peering=mikrom" in c["args"] and "--standalone" not in c["args"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz" and ports[c[probe]["httpGet"]["port"]] == 8080, probe
    assert pod_spec(operator)["securityContext"]["runAsUser"] == 65532
    pdb = one(docs, "PodDisruptionBudget", "operator")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == operator["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def test_the_worker_runs_on_kvm_nodes_with_host_network_pid_state_and_cgroups_and_its_node_name():
    worker = one(render(), "DaemonSet", "worker")
    spec = pod_spec(worker)
    assert spec["nodeSelector"] == {"mikrom.io/kvm": "true"}
    assert spec["hostNetwork"] is True and spec["hostPID"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert worker["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    (c,) = spec["containers"]
    env = env_of(c)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert spec["terminationGracePeriodSeconds"] > int(env["MIKROM_TASK_TIME_LIMIT"]["value"])
    assert c["securityContext"]["privileged"] is True
    assert "memory" not in c["resources"].get("limits", {}), "a memory limit would count what the worker copies"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["state"]["hostPath"]["path"] == mounts["state"]["mountPath"] == env["MIKROM_STATE_DIR"]["value"]
    assert env["MIKROM_IMAGE_DIR"]["value"].startswith(env["MIKROM_STATE_DIR"]["value"] + "/")
    assert volumes["host-cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup"
    assert mounts["host-cgroup"]["mountPath"] == env["MIKROM_HOST_CGROUP_ROOT"]["value"] == "/sys/fs/cgroup"
    assert env["MIKROM_HOST_CGROUP_PARENT"]["value"] == "mikrom"
    assert env["MIKROM_HOST_CGROUPS"]["value"] == "true"
    off = env_of(pod_spec(one(render(sets=("worker.hostCgroup.enabled=false",)), "DaemonSet", "worker"))["containers"][0])
    assert off["MIKROM_HOST_CGROUPS"]["value"] == "false"


def test_the_workers_probes_ping_its_own_celery_node_name_and_liveness_is_off_by_default(monkeypatch):
    (c,) = pod_spec(one(render(), "DaemonSet", "worker"))["containers"]
    assert "livenessProbe" not in c
    for probe in ("startupProbe", "readinessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["sh", "-c"]
        assert 'celery -A mikrom.celery_app inspect ping -d "mikrom@$NODE_NAME"' in command[2]
    # ... which is the name `mikrom worker` gives the Celery node
    import celery.__main__
    from mikrom import cli

    seen = {}
    monkeypatch.setattr(celery.__main__, "main", lambda: seen.setdefault("argv", list(sys.argv)) and 0)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("MIKROM_REDIS_PASSWORD", "test-only")
    cli.main(["worker", "--node", "kvm-7"])
    argv = seen["argv"]
    assert argv[argv.index("-n") + 1] == "mikrom@kvm-7"


def test_an_unprivileged_worker_gets_the_listed_capabilities_and_the_device_nodes():
    (values,) = [v for v in CI_VALUES if v.name == "all-values.yaml"]
    spec = pod_spec(one(render(values), "DaemonSet", "worker"))
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "KILL"]}
    devices = {v["hostPath"]["path"]: v["hostPath"]["type"] for v in spec["volumes"] if v.get("hostPath")}
    assert devices["/dev/kvm"] == devices["/dev/net/tun"] == "CharDevice"
    assert devices["/srv/mikrom"] == devices["/srv/images"] == devices["/srv/mikrom-jails"] == "DirectoryOrCreate"
    env = env_of(c)
    assert env["MIKROM_JAILER_BINARY"]["value"] == "/opt/firecracker/jailer"
    assert env["MIKROM_HOST_CGROUP_PARENT"]["value"] == "kubepods-vms/mikrom"
    assert "livenessProbe" in c


def test_beat_is_one_replica_replaced_with_recreate_its_schedule_and_pidfile_on_an_emptydir():
    beat = one(render(), "Deployment", "beat")
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"] == {"type": "Recreate"}
    spec = pod_spec(beat)
    (c,) = spec["containers"]
    assert c["command"][:4] == ["celery", "-A", "mikrom.celery_app", "beat"]
    args = dict(a.split("=", 1) for a in c["args"] if "=" in a)
    empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    dirs = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in empty}
    for option in ("--schedule", "--pidfile"):
        assert str(Path(args[option]).parent) in dirs, option
    assert spec["automountServiceAccountToken"] is False


def test_flower_takes_its_login_from_a_secret_in_the_environment_read_only_with_probes_on_its_prefix():
    docs = render()
    flower = one(docs, "Deployment", "flower")
    (c,) = pod_spec(flower)["containers"]
    env = env_of(c)
    ref = env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"])
    import base64
    login = base64.b64decode(secret["data"][ref["key"]]).decode()
    user, password = login.split(":", 1)
    assert user == "admin" and len(password) >= 24 and password.isalnum()
    assert env["FLOWER_READ_ONLY"]["value"] == "true"
    assert env["FLOWER_URL_PREFIX"]["value"] == "flower"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/flower/healthcheck", probe
    assert not any("basic_auth" in a or "auth" in a for a in c["command"] + c.get("args", []))


@pytest.mark.parametrize("secret,key", [("t-mikrom-flower", "password"), ("t-mikrom-redis", "redis-password")])
def test_no_default_password_but_a_random_one_per_install(secret, key):
    import base64

    def password(docs):
        found = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == secret)
        return base64.b64decode(found["data"][key]).decode()

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["flower"]["basicAuth"]["password"] == values["redis"]["auth"]["password"] == ""
    # two renders without a cluster (no existing Secret to keep) are two installs
    first = password(render(sets=("flower.enabled=true",)))
    second = password(render(sets=("flower.enabled=true", "beat.enabled=true")))
    assert first != second and len(first) >= 24 and first.isalnum()


def _ingress_matches(paths: list[dict], url: str) -> bool:
    for p in paths:
        if p["pathType"] == "Exact" and url == p["path"]:
            return True
        if p["pathType"] == "Prefix":
            prefix = p["path"].rstrip("/")
            if url == prefix or url.startswith(prefix + "/"):
                return True
    return False


def _sample(pattern: str) -> str:
    return re.sub(r"\(\.[+*]\)", "x", pattern).replace("/?", "")


@pytest.mark.parametrize("prefix", ["flower", "ops/flower", ""])
def test_the_ingress_reaches_every_flower_page_and_api_but_not_metrics(prefix):
    from flower.urls import handlers

    docs = render(sets=("flower.ingress.enabled=true", f"flower.urlPrefix={prefix}",
                        "flower.ingress.hosts[0]=flower.example.com"))
    ingress = one(docs, "Ingress", "flower")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "flower.example.com"
    paths = rule["http"]["paths"]
    base = f"/{prefix}" if prefix else ""
    routes = [getattr(h, "regex", None).pattern if hasattr(h, "regex") else h[0] for h in handlers]
    for route in routes:
        route = route.rstrip("$")
        if route in (r".*", "/metrics", "/healthcheck"):
            continue
        url = base + _sample(route)
        assert _ingress_matches(paths, url), f"{url} is not reachable through the Ingress"
    assert not _ingress_matches(paths, f"{base}/metrics"), "/metrics must stay off the Ingress"
    assert not _ingress_matches(paths, f"{base}/metrics/"), "/metrics must stay off the Ingress"


def test_the_in_chart_redis_gets_its_password_from_a_secret_and_components_the_same_one():
    docs = render()
    redis = one(docs, "StatefulSet", "redis")
    spec = pod_spec(redis)
    init = spec["initContainers"][0]
    ref = env_of(init)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "t-mikrom-redis", "key": "redis-password"}
    assert env_of(spec["containers"][0])["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == ref
    for workload in ("operator", "beat", "flower"):
        (c,) = pod_spec(one(docs, "Deployment", workload))["containers"]
        assert env_of(c)["MIKROM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref, workload
        assert env_of(c)["MIKROM_BROKER_URL"]["value"] == "redis://t-mikrom-redis.mikrom-system.svc.cluster.local:6379/0"
    assert spec["containers"][0]["command"] == ["redis-server", "/run/redis/redis.conf"]
    run = next(v for v in spec["volumes"] if v["name"] == "run")
    assert run["emptyDir"]["medium"] == "Memory"


def test_redis_auth_values_pick_the_secret():
    docs = render(sets=("redis.auth.existingSecret=mine", "redis.auth.existingSecretPasswordKey=pw"))
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "t-mikrom-redis"]
    (c,) = pod_spec(one(docs, "Deployment", "operator"))["containers"]
    assert env_of(c)["MIKROM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "pw"}
    docs = render(sets=("redis.auth.password=given-password",))
    import base64
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "t-mikrom-redis")
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == "given-password"


def test_sentinel_mode_gives_every_component_sentinel_urls_and_the_master_name():
    docs = render(sets=("redis.sentinel.enabled=true",))
    redis = one(docs, "StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 3
    assert [c["name"] for c in pod_spec(redis)["containers"]] == ["redis", "sentinel"]
    (c,) = pod_spec(one(docs, "Deployment", "operator"))["containers"]
    env = env_of(c)
    urls = env["MIKROM_BROKER_URL"]["value"].split(";")
    assert urls == [f"sentinel://t-mikrom-redis-{i}.t-mikrom-redis-headless.mikrom-system.svc.cluster.local:26379"
                    + ("/0" if i == 2 else "") for i in range(3)]
    assert env["MIKROM_BROKER_SENTINEL_MASTER"]["value"] == "mymaster"
    assert one(docs, "PodDisruptionBudget", "redis")["spec"]["maxUnavailable"] == 1
    headless = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-headless"))
    assert headless["spec"]["publishNotReadyAddresses"] is True


def test_an_external_redis_takes_the_url_and_the_secret_given():
    (values,) = [v for v in CI_VALUES if v.name == "external-redis-values.yaml"]
    docs = render(values)
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    (c,) = pod_spec(one(docs, "Deployment", "operator"))["containers"]
    env = env_of(c)
    assert env["MIKROM_BROKER_URL"]["value"].startswith("sentinel://redis-0.example.internal:26379;")
    assert env["MIKROM_RESULT_BACKEND"]["value"].endswith("/3")
    assert env["MIKROM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "broker-credentials", "key": "password"}
    assert env["MIKROM_BROKER_SENTINEL_MASTER"]["value"] == "broker"


PASSWORDS = ("Redis-Pw-4c1f9e", "Flower-Pw-77aa21")


@pytest.mark.parametrize("extra", [(), ("redis.sentinel.enabled=true", "flower.ingress.enabled=true")])
def test_no_password_appears_in_any_command_line_or_plain_environment_value(extra):
    docs = render(sets=(f"redis.auth.password={PASSWORDS[0]}", f"flower.basicAuth.password={PASSWORDS[1]}", *extra))
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        for c in containers(pod_spec(doc)):
            argv = " ".join(c.get("command", []) + c.get("args", []))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                argv += " " + " ".join(c.get(probe, {}).get("exec", {}).get("command", []))
            plain = " ".join(str(e.get("value", "")) for e in c.get("env", []))
            for secret in PASSWORDS:
                assert secret not in argv and secret not in plain, (doc["metadata"]["name"], c["name"])
            assert not re.search(r"requirepass|basic_auth|--password|-a ", argv), (doc["metadata"]["name"], argv)
            for e in c.get("env", []):
                if re.search(r"PASSWORD|AUTH", e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (doc["metadata"]["name"], e["name"])
    secrets = [d for d in docs if d["kind"] == "Secret"]
    configmaps = " ".join(json.dumps(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap")
    assert not any(p in configmaps for p in PASSWORDS)
    assert {s["metadata"]["name"] for s in secrets} == {"t-mikrom-redis", "t-mikrom-flower"}


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_image_is_pinned_by_tag_and_digests_are_appended(values):
    docs = render(*([values] if values else []))
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
              for c in containers(pod_spec(d))}
    for image in images:
        name = image.split("@")[0]
        tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", image
    if values and values.name == "all-values.yaml":
        assert all("@sha256:" in i for i in images), images


def test_the_default_ip_pool_is_deleted_by_a_pre_delete_hook_allowed_that_pool_only():
    docs = render()
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
    assert sorted(d["kind"] for d in hooks) == ["ClusterRole", "ClusterRoleBinding", "Job", "ServiceAccount"]
    (role,) = [d for d in hooks if d["kind"] == "ClusterRole"]
    assert role["rules"] == [{"apiGroups": ["mikrom.io"], "resources": ["ippools"], "resourceNames": ["default"],
                              "verbs": ["get", "delete", "patch"]}]
    (job,) = [d for d in hooks if d["kind"] == "Job"]
    # its pod is no operator pod: neither the operator's Deployment nor its PDB may count it
    operator = one(docs, "Deployment", "operator")
    selector = operator["spec"]["selector"]["matchLabels"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not all(labels.get(k) == v for k, v in selector.items())
    (c,) = pod_spec(job)["containers"]
    assert c["command"][-2:] == ["default", "60"]
    assert not [d for d in render(sets=("ipPool.create=false",)) if d["metadata"].get("annotations", {}).get("helm.sh/hook")]


def test_the_default_ip_pool_is_the_example_one():
    pool = one(render(), "IPPool")
    example = yaml.safe_load((REPO / "examples" / "ippool-default.yaml").read_text())
    assert pool["apiVersion"] == example["apiVersion"]
    assert pool["metadata"]["name"] == example["metadata"]["name"] and pool["spec"] == example["spec"]


def test_notes_tell_how_to_open_flower_and_apply_a_first_vm(tmp_path):
    # helm renders NOTES.txt only on install; a copy of the chart renders it as a template
    chart = tmp_path / "mikrom"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "zz-notes.yaml").write_text(
        "notes: |\n" + "".join(f"  {line}\n" for line in (CHART / "templates" / "NOTES.txt").read_text().splitlines()))
    res = run_helm("template", RELEASE, str(chart), "-n", NAMESPACE, "--show-only", "templates/zz-notes.yaml", chart=chart)
    assert res.returncode == 0, res.stderr
    notes = yaml.safe_load(res.stdout)["notes"]
    assert "kubectl get secret -n mikrom-system t-mikrom-flower -o jsonpath='{.data.password}'" in notes
    assert "kubectl port-forward -n mikrom-system svc/t-mikrom-flower 5555" in notes
    assert "http://127.0.0.1:5555/flower/" in notes
    assert "kubectl apply -n default -f examples/microvm.yaml" in notes
    assert "mikrom.io/kvm=true" in notes


# ------------------------------------------------------------------------------ the images

def _dockerfile(name: str) -> str:
    return (REPO / name).read_text()


def _instruction(text: str, name: str) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in text.splitlines() if line.startswith(name + " ")]


def test_the_charts_defaults_agree_with_what_the_dockerfiles_pin():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], "the default image tags are the chart's appVersion"

    operator, worker = _dockerfile("Dockerfile.operator"), _dockerfile("Dockerfile.worker")
    (user,) = _instruction(operator, "USER")
    uid, gid = (int(x) for x in user.split(":"))
    psc = values["podSecurityContext"]
    assert (psc["runAsUser"], psc["runAsGroup"]) == (uid, gid), "the operator image's USER"
    for text in (operator, worker):
        assert str(values["metrics"]["port"]) in _instruction(text, "EXPOSE")
    docs = render()
    (op,) = pod_spec(one(docs, "Deployment", "operator"))["containers"]
    (wk,) = pod_spec(one(docs, "DaemonSet", "worker"))["containers"]
    assert json.loads(_instruction(operator, "ENTRYPOINT")[-1]) == op["command"]
    assert json.loads(_instruction(worker, "ENTRYPOINT")[-1]) == wk["command"]
    # the jailer lands where the chart looks for it
    if "jailer" in worker:
        assert values["worker"]["jailer"]["binary"] in worker
    # the base every image shares is bookworm, as is the Redis image's tag
    assert "bookworm" in values["redis"]["image"]["tag"]
    assert all("bookworm" in arg for arg in _instruction(operator, "ARG") if arg.startswith("BASE_IMAGE="))


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_every_mikrom_variable_the_chart_sets_is_a_setting(values):
    import dataclasses

    from mikrom.settings import Settings

    known = {"MIKROM_" + f.name.upper() for f in dataclasses.fields(Settings)}
    docs = render(*([values] if values else []))
    unknown = {(d["metadata"]["name"], e["name"]) for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
               for c in containers(pod_spec(d)) for e in c.get("env", [])
               if e["name"].startswith("MIKROM_") and e["name"] not in known}
    assert not unknown, f"not in mikrom/settings.py: {sorted(unknown)}"
