"""The test control plane is a real API server: structural schemas, printer columns and RBAC
behave as in production."""

import json
import subprocess
import uuid

import pytest
import yaml
from harness import binaries
from harness.serviceaccounts import ServiceAccount


def _crd(group: str) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget", "shortNames": ["gdg"]},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Colour", "type": "string", "jsonPath": ".spec.colour"},
                    {"name": "Note", "type": "string", "jsonPath": ".spec.note", "priority": 1},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "required": ["size"],
                            "properties": {
                                "size": {"type": "integer", "minimum": 1, "maximum": 8},
                                "colour": {"type": "string", "enum": ["red", "blue"]},
                                "note": {"type": "string"},
                            },
                        },
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    },
                }},
            }],
        },
    }


@pytest.fixture
def gadget_crd(control_plane):
    group = f"g{uuid.uuid4().hex[:6]}.test.mikrom.io"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(_crd(group)))
    control_plane.kubectl("wait", "--for=condition=Established", f"crd/gadgets.{group}", "--timeout=60s")
    return group


def test_api_server_rejects_schema_violation_naming_the_field(control_plane, namespace, gadget_crd):
    bad = {"apiVersion": f"{gadget_crd}/v1", "kind": "Gadget", "metadata": {"name": "big", "namespace": namespace},
           "spec": {"size": 99, "colour": "green"}}
    res = control_plane.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert res.returncode != 0
    assert "spec.size" in res.stderr and "spec.colour" in res.stderr, res.stderr


def test_valid_object_reads_back_with_printer_columns(control_plane, namespace, gadget_crd):
    good = {"apiVersion": f"{gadget_crd}/v1", "kind": "Gadget", "metadata": {"name": "g1", "namespace": namespace},
            "spec": {"size": 3, "colour": "red", "note": "wide-only"}}
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(good))
    out = control_plane.kubectl("get", f"gadgets.{gadget_crd}", "-n", namespace, "-o", "wide").stdout
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "SIZE", "COLOUR", "NOTE"]
    assert row.split() == ["g1", "3", "red", "wide-only"]
    narrow = control_plane.kubectl("get", f"gadgets.{gadget_crd}", "-n", namespace).stdout
    assert "NOTE" not in narrow.splitlines()[0]


def test_rbac_denies_unbound_service_account_until_a_role_binds_it(control_plane, namespace):
    cp = control_plane
    reader = ServiceAccount(namespace, "reader").create(cp)

    assert not reader.can(cp, "list", "configmaps", "-n", namespace)
    denied = cp.kubectl("get", "configmaps", "-n", namespace, as_user=reader.user, check=False)
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()

    cp.kubectl("create", "role", "cm-reader", "--verb=get,list", "--resource=configmaps", "-n", namespace)
    cp.kubectl("create", "rolebinding", "cm-reader", "--role=cm-reader", f"--serviceaccount={namespace}:reader",
               "-n", namespace)
    assert reader.can(cp, "list", "configmaps", "-n", namespace)
    assert cp.kubectl("get", "configmaps", "-n", namespace, as_user=reader.user, check=False).returncode == 0
    # still nothing beyond what the role grants
    assert not reader.can(cp, "delete", "configmaps", "-n", namespace)


def test_api_server_reports_its_real_version(control_plane):
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["major"] == "1"
    assert version["serverVersion"]["gitVersion"].startswith("v1.34.")
    assert version["clientVersion"]["gitVersion"].startswith("v1.34.")


def test_service_account_tokens_are_signed_and_accepted(control_plane, namespace, tmp_path):
    cp = control_plane
    bot = ServiceAccount(namespace, "bot").create(cp)
    token = bot.token(cp, duration="10m")
    assert token.count(".") == 2
    # the admin kubeconfig carries a client certificate, which would win over the token: ask without it
    res = subprocess.run([str(binaries.require("kubectl")), "--server", cp.server, "--insecure-skip-tls-verify",
                          f"--token={token}", "auth", "whoami", "-o", "json"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"]["userInfo"]["username"] == bot.user
    # and the minted kubeconfig authenticates as the account alone
    kubeconfig = bot.kubeconfig(cp, tmp_path / "bot.kubeconfig", duration="10m")
    assert kubeconfig.stat().st_mode & 0o777 == 0o600
    res = subprocess.run([str(binaries.require("kubectl")), "--kubeconfig", str(kubeconfig), "auth", "whoami", "-o",
                          "jsonpath={.status.userInfo.username}"], capture_output=True, text=True, timeout=60)
    assert res.stdout == bot.user, res.stderr
