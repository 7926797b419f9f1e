"""Objects from the API server without `metadata.managedFields`, from the moment they are parsed.

The API server's field-management record is most of a MicroVM's body (one entry per writer: the
tenant's client, the operator's status writes, kopf's finalizer, the node's worker), and nothing
in the operator reads it. kopf keeps each object's latest watch event while the object's worker
task lives, and a burst of new VMs keeps a thousand of them alive at once: parsed, that record was
the larger half of what the burst left the process holding (Python's allocator keeps what it once
held, so the peak stays in the resident set). Dropping it as each body is parsed keeps it from
ever being held.

Two places parse bodies, and the server offers no way to leave the field out:

- responses read with `ClientResponse.json()` (kopf's initial listing, its patches' answers):
  `SlimResponse`, passed as the `response_class` of the aiohttp session the operator gives kopf
  (`apisession`);
- the watch streams, whose lines kopf parses itself with `json.loads` (`kopf._cogs.clients.api`,
  `stream`): aiohttp has no hook there, so `install` replaces that module's `json` with one whose
  `loads` strips the field. This is the only place Mikrom reaches into kopf's internals;
  `tests/unit/test_operator_slim_bodies.py` fails if kopf stops parsing its watch lines that way.
"""

from __future__ import annotations

import json
import types
from typing import Any

import aiohttp

MANAGED_FIELDS = "managedFields"


def strip(doc: Any) -> Any:
    """Drop `metadata.managedFields` from an object, a watch event's object or a list's items
    (in place); return `doc`."""
    if not isinstance(doc, dict):
        return doc
    _strip_object(doc)
    obj = doc.get("object")
    if isinstance(obj, dict):
        _strip_object(obj)
    items = doc.get("items")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                _strip_object(item)
    return doc


def _strip_object(obj: dict) -> None:
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop(MANAGED_FIELDS, None)


def loads(s: str | bytes | bytearray, **kwargs: Any) -> Any:
    """`json.loads`, then `strip`."""
    return strip(json.loads(s, **kwargs))


class SlimResponse(aiohttp.ClientResponse):
    """An aiohttp response whose `json()` leaves out `metadata.managedFields`."""

    async def json(self, **kwargs: Any) -> Any:
        return strip(await super().json(**kwargs))


def _slim_json_module() -> types.ModuleType:
    slim = types.ModuleType("mikrom_slim_json", "json, with loads dropping metadata.managedFields")
    slim.__dict__.update({k: v for k, v in vars(json).items() if not k.startswith("__")})
    slim.loads = loads
    return slim


SLIM_JSON = _slim_json_module()


def install() -> None:
    """Make kopf's watch streams parse their lines with `loads` (idempotent)."""
    from kopf._cogs.clients import api

    api.json = SLIM_JSON
