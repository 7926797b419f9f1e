"""One namespace's MicroVMs through the admin client: the calls every test client shares."""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from mikrom import names

G, V, PLURAL = names.GROUP, names.VERSION, names.MICROVMS
T = (5, 30)
"""(connect, read) timeout of every API call."""


class MicroVMClient:
    """Create, read, patch, delete and list the test's MicroVMs. Subclasses say what a new
    MicroVM looks like (`manifest`) and add their own waits."""

    def __init__(self, api_client, namespace: str):
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ns = namespace

    def manifest(self, name: str, **spec) -> dict:
        raise NotImplementedError

    def create(self, name: str, **spec) -> dict:
        return self.api.create_namespaced_custom_object(G, V, self.ns, PLURAL, self.manifest(name, **spec),
                                                        _request_timeout=T)

    def get(self, name: str) -> dict | None:
        return _or_none(lambda: self.api.get_namespaced_custom_object(G, V, self.ns, PLURAL, name,
                                                                      _request_timeout=T))

    def cluster_object(self, plural: str, name: str) -> dict | None:
        """A cluster-scoped Mikrom object (a MicroVMNode or an IPPool), or None."""
        return _or_none(lambda: self.api.get_cluster_custom_object(G, V, plural, name, _request_timeout=T))

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    def patch(self, name: str, body: dict) -> dict:
        return self.api.patch_namespaced_custom_object(G, V, self.ns, PLURAL, name, body, _request_timeout=T)

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(G, V, self.ns, PLURAL, name, _request_timeout=T)

    def list(self) -> list[dict]:
        return self.api.list_namespaced_custom_object(G, V, self.ns, PLURAL, _request_timeout=T)["items"]

    def names(self) -> list[str]:
        return [vm["metadata"]["name"] for vm in self.list()]


def _or_none(read):
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
