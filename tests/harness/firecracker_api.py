"""Firecracker's API specification (the copy in tests/data/firecracker) as a request validator."""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path

import jsonschema
import yaml

SPEC_FILE = Path(__file__).resolve().parents[1] / "data" / "firecracker" / "firecracker-api-v1.16.1.yaml"


@cache
def load_api() -> dict:
    return yaml.safe_load(SPEC_FILE.read_text())


def _strict(schema):
    """Forbid unknown properties in every object schema that lists its properties.

    Firecracker deserialises request bodies with serde's deny_unknown_fields, so an unknown field
    is a 400 at boot time; the swagger file does not say so, so the test adds it.
    """
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def _operation(api, method, path):
    """The spec's operation and path parameters for a concrete request path."""
    for template, ops in api["paths"].items():
        pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
        match = re.match(pattern, path)
        if match and method.lower() in ops:
            return ops[method.lower()], match.groupdict()
    return None, None


def validate_request(api, method, path, body):
    op, path_params = _operation(api, method, path)
    assert op is not None, f"{method} {path} is not in the Firecracker API"
    body_params = [p for p in op.get("parameters", []) if p["in"] == "body"]
    if not body_params:
        assert body is None, f"{method} {path} takes no body"
        return
    param = body_params[0]
    if param.get("required"):
        assert body is not None, f"{method} {path} requires a body"
    schema = _strict({**param["schema"], "definitions": api["definitions"]})
    jsonschema.Draft4Validator(schema).validate(body)
    # Firecracker refuses a body whose id differs from the id in the path.
    for name, value in path_params.items():
        body_key = {"drive_id": "drive_id", "iface_id": "iface_id"}.get(name)
        if body_key:
            assert body[body_key] == value, f"{path}: body {body_key}={body[body_key]!r} differs from the path"
