"""docs/api.md is generated from the typed models: regenerating it changes nothing, and it names
every field the CRDs declare with the bounds, enums, defaults and CEL rule messages the API server
enforces."""

from pathlib import Path

import pytest

from mikrom import apidoc, crdgen, models

REPO = Path(__file__).resolve().parents[2]


def test_regenerated_api_reference_is_identical_to_the_checked_in_one():
    checked_in = (REPO / "docs" / "api.md").read_text()
    assert apidoc.render() == checked_in, "docs/api.md is out of date with mikrom/models.py; run `make docs`"


@pytest.mark.parametrize("resource", crdgen.RESOURCES, ids=lambda r: r["kind"])
def test_every_declared_spec_and_status_field_has_a_row(resource):
    page = apidoc.render()
    schema = crdgen.schema_of(resource["model"])
    for section in ("spec", "status"):
        for path, _prop, _required in apidoc._rows(schema["properties"][section], section):
            assert f"| `{path}` |" in page, path


def test_bounds_enums_defaults_and_required_fields_are_shown():
    rows = {line.split(" | ")[0].strip("| `"): line for line in apidoc.render().splitlines() if line.startswith("| `")}
    assert "| `1` | 1..32 |" in rows["spec.vcpus"]
    assert "128..65536" in rows["spec.memoryMiB"] and "`512`" in rows["spec.memoryMiB"]
    assert "one of `Always`, `RerunOnFailure`, `Once`, `Halted`" in rows["spec.runStrategy"]
    assert "| required |" in rows["spec.image"] and "| required |" in rows["spec.cidr"]
    assert "16..30" in rows["spec.blockSize"] and "`26`" in rows["spec.blockSize"]
    assert "map of string" in rows["spec.nodeSelector"]
    assert "list map keyed by `type`" in rows["status.conditions"]


def test_every_cel_rule_message_of_the_models_appears_with_its_rule():
    page = apidoc.render()
    messages = set()

    def collect(node):
        if isinstance(node, dict):
            for rule in node.get("x_validations", []):
                messages.add(rule["message"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    for model in (models.MicroVM, models.MicroVMNode, models.IPPool):
        collect(model.model_json_schema())
    assert "url requires sha256" in messages and "spec.cidr is immutable" in messages
    missing = [m for m in messages if f"“{m}”" not in page]
    assert not missing, missing


def test_a_pipe_in_a_pattern_or_rule_does_not_split_the_table_row():
    # IPV4_CIDR and the '..' rule contain "|": unescaped, the row would grow extra cells
    for line in apidoc.render().splitlines():
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 6, line
