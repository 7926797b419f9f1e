"""The CRDs in crds/ are generated from the typed models: regenerating them changes nothing, every
schema property says what it is, and every status field the models know is declared (the API
server silently prunes undeclared ones)."""

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mikrom import crdgen, models

REPO = Path(__file__).resolve().parents[2]
KINDS = {"MicroVM": models.MicroVM, "MicroVMNode": models.MicroVMNode, "IPPool": models.IPPool}


def _crds() -> dict[str, dict]:
    out = {}
    for path in sorted((REPO / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def _schema(kind: str) -> dict:
    return _crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_regenerated_crds_are_identical_to_the_checked_in_ones(tmp_path):
    crdgen.write(tmp_path)
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.yaml")}
    checked_in = {p.name: p.read_text() for p in (REPO / "crds").glob("*.yaml")}
    assert sorted(generated) == sorted(checked_in)
    stale = [name for name in generated if generated[name] != checked_in[name]]
    assert not stale, f"crds/ is out of date with mikrom/models.py: {stale}; run `python -m mikrom.crdgen`"


def _properties(node: dict, path: str):
    for name, prop in (node.get("properties") or {}).items():
        if path.count(".") == 0 and name == "metadata":
            continue  # the API server forbids anything but `type` on the root's metadata
        yield f"{path}.{name}", prop
        yield from _properties(prop, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _properties(node[key], f"{path}[]")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_schema_property_has_a_description(kind):
    missing = [path for path, prop in _properties(_schema(kind), kind) if not prop.get("description")]
    assert not missing, missing


def _model_of(annotation) -> type[BaseModel] | None:
    """The model inside Optional[X], list[X] or X, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _undeclared(model: type[BaseModel], schema: dict, path: str) -> list[str]:
    out = []
    props = schema.get("properties") or {}
    for name, field in model.model_fields.items():
        if name not in props:
            out.append(f"{path}.{name}")
            continue
        inner = _model_of(field.annotation)
        if inner is not None:
            sub = props[name].get("items", props[name]) if props[name].get("type") == "array" else props[name]
            out += _undeclared(inner, sub, f"{path}.{name}")
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_status_field_of_the_models_is_declared(kind):
    status_model = _model_of(KINDS[kind].model_fields["status"].annotation)
    assert _undeclared(status_model, _schema(kind)["properties"]["status"], f"{kind}.status") == []


def test_the_operators_status_writes_fit_the_schema():
    # what the operator writes besides the worker's fields
    props = _schema("MicroVM")["properties"]["status"]["properties"]
    assert {"phase", "node", "dispatch", "conditions", "message", "reason"} <= set(props)
    assert set(props["dispatch"]["properties"]) == {"intent", "attempts", "sentAt", "taskId", "key"}
    node_props = _schema("MicroVMNode")["properties"]
    assert {"cidr", "pool", "schedulable"} <= set(node_props["spec"]["properties"])
    assert {"allocated", "usage", "vmCount", "conditions"} <= set(node_props["status"]["properties"])
    assert set(_schema("IPPool")["properties"]["status"]["properties"]) == {"blocks", "blockCount", "allocated",
                                                                            "available", "message"}


def test_conditions_are_a_map_keyed_by_type():
    for kind in ("MicroVM", "MicroVMNode"):
        conds = _schema(kind)["properties"]["status"]["properties"]["conditions"]
        assert conds["x-kubernetes-list-type"] == "map" and conds["x-kubernetes-list-map-keys"] == ["type"]


def test_optional_image_parts_keep_their_cel_rules():
    image = _schema("MicroVM")["properties"]["spec"]["properties"]["image"]["properties"]
    for part in ("kernel", "rootfs", "initrd"):
        rules = [r["rule"] for r in image[part]["x-kubernetes-validations"]]
        assert "!has(self.url) || has(self.sha256)" in rules, part
        assert image[part]["properties"]["path"]["x-kubernetes-validations"], part


def test_printer_columns_and_short_names():
    crds = _crds()
    cols = [c["name"] for c in crds["MicroVM"]["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols[:6] == ["Phase", "Node", "IP", "vCPUs", "Memory", "Age"]
    assert crds["MicroVM"]["spec"]["names"]["shortNames"] == ["mvm"]
    assert all(c["spec"]["versions"][0]["subresources"] == {"status": {}} for c in crds.values())
