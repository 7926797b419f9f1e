"""One namespace's MicroVMs through the admin client: the calls and waits every test client shares,
and the cluster-scoped Mikrom objects (MicroVMNodes, IPPools) beside them."""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from mikrom import names

from .waits import wait_for

G, V, PLURAL = names.GROUP, names.VERSION, names.MICROVMS
T = (5, 30)
"""(connect, read) timeout of every API call."""


class MicroVMClient:
    """Create, read, patch, delete, list and wait on the test's MicroVMs. Subclasses say what a new
    MicroVM looks like (`manifest`) and add their own helpers."""

    PHASE_TIMEOUT = 30.0
    """How long `wait_phase` waits unless told (a subclass whose VMs really boot waits longer)."""

    def __init__(self, api_client, namespace: str):
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ns = namespace

    def manifest(self, name: str, **spec) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ the namespace's MicroVMs
    def create(self, name: str, **spec) -> dict:
        return self.api.create_namespaced_custom_object(G, V, self.ns, PLURAL, self.manifest(name, **spec),
                                                        _request_timeout=T)

    def get(self, name: str) -> dict | None:
        return _or_none(lambda: self.api.get_namespaced_custom_object(G, V, self.ns, PLURAL, name,
                                                                      _request_timeout=T))

    def uid(self, name: str) -> str:
        return self.get(name)["metadata"]["uid"]

    def status(self, name: str) -> dict:
        return (self.get(name) or {}).get("status") or {}

    def condition(self, name: str, type_: str) -> dict:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    def patch(self, name: str, body: dict) -> dict:
        return self.api.patch_namespaced_custom_object(G, V, self.ns, PLURAL, name, body, _request_timeout=T)

    def patch_status(self, name: str, status: dict) -> dict:
        """Merge `status` into the status subresource (a test playing the operator's or the node's part)."""
        return self.api.patch_namespaced_custom_object_status(G, V, self.ns, PLURAL, name, {"status": status},
                                                              _request_timeout=T)

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(G, V, self.ns, PLURAL, name, _request_timeout=T)

    def list(self) -> list[dict]:
        return self.api.list_namespaced_custom_object(G, V, self.ns, PLURAL, _request_timeout=T)["items"]

    def names(self) -> list[str]:
        return [vm["metadata"]["name"] for vm in self.list()]

    # ------------------------------------------------------------------ waits
    def wait_phase(self, name: str, phase: str, timeout: float | None = None, avoid: tuple = ()) -> dict:
        """The status once `name` is in `phase`; fail at once if it reaches a phase in `avoid`."""
        def reached() -> dict | None:
            st = self.status(name)
            return st if st.get("phase") == phase else None

        def dead_end() -> str | None:
            st = self.status(name)
            return f"{name} reached {st.get('phase')}: {st}" if st.get("phase") in avoid else None

        return wait_for(reached, self.PHASE_TIMEOUT if timeout is None else timeout, f"{name} to be {phase}",
                        abort=dead_end if avoid else None)

    def wait_gone(self, name: str, timeout: float = 60) -> None:
        wait_for(lambda: self.get(name) is None, timeout, f"{name} to be gone")

    def remove_all(self, wait: float = 0) -> None:
        """Delete every MicroVM of the namespace; give the normal flow `wait` seconds to finish
        (the node confirms), then strip the finalizers of those still there."""
        for name in self.names():
            _unless_gone(lambda: self.delete(name))
        if wait:
            try:
                wait_for(lambda: not self.names(), wait, "every MicroVM to be deleted", interval=0.5)
            except AssertionError:
                pass  # the finalizers come off below
        for name in self.names():
            _unless_gone(lambda: self.patch(name, {"metadata": {"finalizers": None}}))

    # ------------------------------------------------------------------ cluster-scoped objects
    def cluster_object(self, plural: str, name: str) -> dict | None:
        """A cluster-scoped Mikrom object (a MicroVMNode or an IPPool), or None."""
        return _or_none(lambda: self.api.get_cluster_custom_object(G, V, plural, name, _request_timeout=T))

    def create_cluster_object(self, plural: str, kind: str, name: str, spec: dict) -> dict:
        body = {"apiVersion": names.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
        return self.api.create_cluster_custom_object(G, V, plural, body, _request_timeout=T)

    def patch_cluster_object(self, plural: str, name: str, body: dict) -> dict:
        return self.api.patch_cluster_custom_object(G, V, plural, name, body, _request_timeout=T)

    def delete_cluster_object(self, plural: str, name: str) -> None:
        """Delete it if it is there (safe to run twice)."""
        _unless_gone(lambda: self.api.delete_cluster_custom_object(G, V, plural, name, _request_timeout=T))


def _or_none(read):
    try:
        return read()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _unless_gone(call) -> None:
    try:
        call()
    except ApiException as exc:
        if exc.status != 404:
            raise
