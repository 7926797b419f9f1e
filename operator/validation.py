"""Checks of a MicroVM spec that only the operator can make, each naming the offending field.

The API server already enforces the CRD schema and its CEL rules. What it cannot know is the rest
of the cluster: whether the IPPool exists. A `nodeName` with no MicroVMNode or a `nodeSelector` no
node matches is not a spec error: like a Pod's, the VM waits Pending/Unschedulable until such a
node registers (placement says what is missing). Image paths and URLs are checked again here as well (defence in depth:
a CRD installed without its CEL rules must not let a path escape the node's image directory).

Pure functions: the caller passes what it knows of pools and nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import ValidationError

from mikrom import models

IMAGE_PARTS = ("kernel", "rootfs", "initrd")


@dataclass(frozen=True)
class Problem:
    """One invalid field: `field` is the path from the object's root (`spec.network.pool`)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def describe(problems: list[Problem]) -> str:
    """One line for status.message and the Event."""
    return "; ".join(str(p) for p in problems)


def path_escapes(path: str) -> bool:
    """Whether an image `path` could leave the node's image directory."""
    if not path or path.startswith("/") or "\x00" in path or "\\" in path:
        return True
    return any(part == ".." for part in path.split("/"))


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def format_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _schema_problems(spec: dict) -> list[Problem]:
    try:
        models.MicroVMSpec.model_validate(spec)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            out.append(Problem(f"spec.{loc}" if loc else "spec", err["msg"]))
        return out
    return []


def _image_problems(image: dict) -> list[Problem]:
    out: list[Problem] = []
    if not isinstance(image, dict):
        return [Problem("spec.image", "required")]
    if not image.get("kernel"):
        out.append(Problem("spec.image.kernel", "required"))
    if not image.get("rootfs") and not image.get("initrd"):
        out.append(Problem("spec.image", "one of rootfs or initrd is required"))
    for part in IMAGE_PARTS:
        source = image.get(part)
        if not isinstance(source, dict):
            continue
        field = f"spec.image.{part}"
        url, path = source.get("url"), source.get("path")
        if bool(url) == (path is not None):
            out.append(Problem(field, "exactly one of url or path must be set"))
        if url and not source.get("sha256"):
            out.append(Problem(f"{field}.sha256", "required when url is set (downloads are verified)"))
        if path is not None and path_escapes(path):
            out.append(Problem(f"{field}.path", f"{path!r} is not inside the node's image directory "
                                                "(relative paths without '..' only)"))
    return out


def validate(spec: dict, pools: Mapping[str, dict], nodes: Mapping[str, dict] | None = None) -> list[Problem]:
    """Everything wrong with `spec`, given the IPPools (name -> object) that exist. `nodes` is
    not consulted (placement judges nodeName and nodeSelector) and kept for the callers' sake.
    An empty list means the operator may place the VM."""
    problems = _image_problems(spec.get("image"))
    seen = {p.field for p in problems}
    problems += [p for p in _schema_problems(spec) if p.field not in seen and not p.field.startswith("spec.image")]

    network = spec.get("network")
    if isinstance(network, dict):
        pool = network.get("pool") or "default"
        if pool not in pools:
            problems.append(Problem("spec.network.pool", f"IPPool {pool!r} does not exist"))

    return problems
