"""Generate the CustomResourceDefinitions in `crds/` from the typed models.

`python -m mikrom.crdgen [DIR]` writes them; `mikrom crds` prints them. A test regenerates them
and fails on any difference with the checked-in files.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from . import models, names

_KEEP = {"type", "description", "minimum", "maximum", "minLength", "maxLength", "pattern", "enum", "format",
         "items", "properties", "required", "additionalProperties", "default", "minItems", "maxItems"}


def _resolve(node: Any, defs: dict, in_status: bool) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs, in_status) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        target.update(node)  # a field's own description wins over the model's docstring
        node = target
    if "anyOf" in node:  # Optional[X] is anyOf [X, null]: the API expresses it by omission
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        assert len(options) == 1, options
        rest = node
        node = _resolve(options[0], defs, in_status)
        node.update({k: v for k, v in rest.items() if k != "default" or v is not None})
    if "const" in node:
        node["enum"] = [node.pop("const")]
    out: dict = {}
    for key, value in node.items():
        if key == "x_validations":
            out["x-kubernetes-validations"] = value
        elif key == "x_list_map_keys":
            out["x-kubernetes-list-type"] = "map"
            out["x-kubernetes-list-map-keys"] = value
        elif key == "properties":
            status_here = in_status
            out["properties"] = {k: _resolve(v, defs, status_here or k == "status") for k, v in value.items()}
        elif key in ("items", "additionalProperties"):
            # extra="forbid" gives additionalProperties: false, which a structural schema expresses
            # by pruning (and which it forbids beside properties)
            if isinstance(value, bool):
                continue
            out[key] = _resolve(value, defs, in_status)
        elif key == "default":
            # only scalar defaults of the spec: the API server applies them on write
            if not in_status and isinstance(value, (int, float, str, bool)) and value is not None:
                out["default"] = value
        elif key in _KEEP:
            out[key] = value
        elif key.startswith("x-kubernetes-"):  # already translated (an Optional model resolved above)
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def schema_of(model: type[models.Model]) -> dict:
    raw = model.model_json_schema(mode="serialization", ref_template="#/$defs/{model}")
    defs = raw.pop("$defs", {})
    schema = _resolve(raw, defs, in_status=False)
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "description": "APIVersion of this object."}
    props["kind"] = {"type": "string", "description": "Kind of this object."}
    props["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    schema.pop("additionalProperties", None)
    return schema


def _col(name, jsonpath, type_="string", priority=0, description=""):
    col = {"name": name, "type": type_, "jsonPath": jsonpath}
    if description:
        col["description"] = description
    if priority:
        col["priority"] = priority
    return col


_READY = '.status.conditions[?(@.type=="Ready")].status'

RESOURCES = [
    dict(model=models.MicroVM, kind="MicroVM", plural=names.MICROVMS, singular="microvm", short=["mvm"],
         scope="Namespaced", categories=["mikrom", "all"],
         description="A microVM run by a Mikrom node (Firecracker or QEMU microvm).",
         columns=[
             _col("Phase", ".status.phase", description="Lifecycle phase"),
             _col("Node", ".status.node", description="MicroVMNode running the VM"),
             _col("IP", ".status.ipAddress", description="Guest address"),
             _col("vCPUs", ".spec.vcpus", "integer"),
             _col("Memory", ".spec.memoryMiB", "integer", description="MiB"),
             _col("Age", ".metadata.creationTimestamp", "date"),
             _col("VMM", ".status.vmm", priority=1),
             _col("Ready", _READY, priority=1),
         ],
         # each worker lists only the VMs placed on its node (fieldSelector=status.node=NAME), so
         # its periodic sync costs the API server that node's VMs, not the cluster's
         selectable=[".status.node"]),
    dict(model=models.MicroVMNode, kind="MicroVMNode", plural=names.MICROVMNODES, singular="microvmnode",
         short=["mvmn"], scope="Cluster", categories=["mikrom"],
         description="A Kubernetes node that runs microVMs, registered by its Mikrom worker.",
         columns=[
             _col("Ready", _READY),
             _col("VMs", ".status.vmCount", "integer"),
             _col("vCPU", ".status.usage.vcpus", description="used/total"),
             _col("Memory", ".status.usage.memoryMiB", description="MiB used/total"),
             _col("CIDR", ".spec.cidr"),
             _col("Schedulable", ".spec.schedulable", "boolean", priority=1),
             _col("VMMs", ".status.vmms", priority=1),
             _col("Age", ".metadata.creationTimestamp", "date"),
         ]),
    dict(model=models.IPPool, kind="IPPool", plural=names.IPPOOLS, singular="ippool", short=["mippool"],
         scope="Cluster", categories=["mikrom"],
         description="An address range carved into one block per node.",
         columns=[
             _col("CIDR", ".spec.cidr"),
             _col("Block", ".spec.blockSize", "integer"),
             _col("Blocks", ".status.blockCount", "integer"),
             _col("Allocated", ".status.allocated", "integer"),
             _col("Available", ".status.available", "integer"),
             _col("Age", ".metadata.creationTimestamp", "date"),
         ]),
]


def crd(resource: dict) -> dict:
    schema = schema_of(resource["model"])
    schema["description"] = resource["description"]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource['plural']}.{names.GROUP}",
                     "labels": {"app.kubernetes.io/part-of": "mikrom"}},
        "spec": {
            "group": names.GROUP,
            "scope": resource["scope"],
            "names": {"kind": resource["kind"], "listKind": resource["kind"] + "List", "plural": resource["plural"],
                      "singular": resource["singular"], "shortNames": resource["short"],
                      "categories": resource["categories"]},
            "versions": [{
                "name": names.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": resource["columns"],
                **({"selectableFields": [{"jsonPath": p} for p in resource["selectable"]]}
                   if resource.get("selectable") else {}),
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


HEADER = "# Generated from mikrom/models.py by `python -m mikrom.crdgen`. Do not edit.\n"


def render_all() -> dict[str, str]:
    return {f"{names.GROUP}_{r['plural']}.yaml": HEADER + yaml.safe_dump(crd(r), sort_keys=False, width=120)
            for r in RESOURCES}


def write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (directory / name).write_text(text)


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "crds"))
