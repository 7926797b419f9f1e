"""Generate the API reference `docs/api.md` from the typed models.

The page is rendered from the same schemas as the CRDs (`mikrom.crdgen.schema_of`), so it says
exactly what the API server enforces: each field's type, default, bounds, pattern, enum and
description, and the messages of the CEL rules. `python -m mikrom.apidoc [FILE]` writes it (`make
docs`); a test regenerates it and fails on any difference with the checked-in page.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

from . import crdgen, names

HEADER = ("<!-- Generated from mikrom/models.py by `python -m mikrom.apidoc docs/api.md` (`make docs`). "
          "Do not edit. -->\n")


def _code(text: Any) -> str:
    """Inline code that survives a Markdown table: pipes escaped, backticks fenced by longer runs."""
    text = str(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(prop: dict) -> str:
    kind = prop.get("type", "")
    if kind == "array":
        return f"array of {_type(prop.get('items', {}))}"
    if kind == "object" and "additionalProperties" in prop and "properties" not in prop:
        return f"map of {_type(prop['additionalProperties'])}"
    return kind or "any"


def _constraints(prop: dict) -> list[str]:
    out = []
    if "enum" in prop:
        out.append("one of " + ", ".join(_code(v) for v in prop["enum"]))
    if "minimum" in prop and "maximum" in prop:
        out.append(f"{prop['minimum']}..{prop['maximum']}")
    elif "minimum" in prop:
        out.append(f"≥ {prop['minimum']}")
    elif "maximum" in prop:
        out.append(f"≤ {prop['maximum']}")
    if "minLength" in prop:
        out.append(f"length ≥ {prop['minLength']}")
    if "maxLength" in prop:
        out.append(f"length ≤ {prop['maxLength']}")
    if "pattern" in prop:
        out.append(f"pattern {_code(prop['pattern'])}")
    if prop.get("x-kubernetes-list-type") == "map":
        out.append("list map keyed by " + ", ".join(_code(k) for k in prop["x-kubernetes-list-map-keys"]))
    return out


def _rules(prop: dict) -> list[str]:
    out = []
    for rule in prop.get("x-kubernetes-validations", []):
        where = f" (on {_code(rule['fieldPath'].lstrip('.'))})" if "fieldPath" in rule else ""
        out.append(f"rule {_code(rule['rule'])}: “{_cell(rule['message'])}”{where}")
    return out


def _rows(node: dict, path: str) -> Iterator[tuple[str, dict, bool]]:
    """(dotted path, property, required) for every property below `node`, depth first."""
    required = set(node.get("required", []))
    for name, prop in (node.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here, prop, name in required
        inner = prop.get("items", prop) if prop.get("type") == "array" else prop
        yield from _rows(inner, f"{here}[]" if inner is not prop else here)


def _table(section: str, schema: dict) -> list[str]:
    lines = ["| field | type | default | constraints and rules | description |", "|---|---|---|---|---|"]
    for path, prop, required in _rows(schema, section):
        default = _code(prop["default"]) if "default" in prop else ("required" if required else "")
        checks = "<br>".join(_constraints(prop) + _rules(prop))
        lines.append(f"| {_code(path)} | {_type(prop)} | {default} | {checks} | {_cell(prop.get('description', ''))} |")
    return lines


def render() -> str:
    out = [HEADER, "# API reference", "",
           f"Group `{names.GROUP}`, version `{names.VERSION}`. Every field below is declared in the CRDs in "
           "`crds/`, generated from the same models (`mikrom/models.py`); the API server enforces the "
           "bounds, patterns, enums and rules on every write. Fields marked *required* have no default; "
           "rules are CEL (`x-kubernetes-validations`) and their message is what a rejected write says. "
           "`docs/protocol.md` says which component writes each status field.", ""]
    for resource in crdgen.RESOURCES:
        kind = resource["kind"]
        out.append(f"- [{kind}](#{kind.lower()})")
    for resource in crdgen.RESOURCES:
        kind = resource["kind"]
        schema = crdgen.schema_of(resource["model"])
        out += ["", f"## {kind}", "",
                f"{resource['description']} Scope: {resource['scope']}; plural `{resource['plural']}`; "
                f"short name{'s' if len(resource['short']) > 1 else ''} "
                + ", ".join(f"`{s}`" for s in resource["short"]) + "."]
        rules = _rules(schema)
        if rules:
            out += [""] + [f"- {r}" for r in rules]
        for section in ("spec", "status"):
            prop = schema["properties"].get(section)
            if prop is None:
                continue
            out += ["", f"### {kind}.{section}", "", _cell(prop.get("description", "")), ""]
            out += [f"- {r}" for r in _rules(prop)] + ([""] if _rules(prop) else [])
            out += _table(section, prop)
    return "\n".join(out) + "\n"


def write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "api.md"))
