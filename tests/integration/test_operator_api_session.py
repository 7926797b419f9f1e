"""kopf, logged in through the operator's API session, reads MicroVMs from the real API server
without `metadata.managedFields`: neither its listing nor its watch stream carries them, though the
stored objects do."""

from __future__ import annotations

import asyncio
import logging

import kopf
from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import auth
from kopf._cogs.structs import credentials
from kubernetes import client
from kubernetes.config import kube_config

from mikrom import names
from mikrom.operator import apisession

G, V, P = names.GROUP, names.VERSION, names.MICROVMS


def _manifest(name: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": "MicroVM", "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"vcpus": 1, "memoryMiB": 128,
                     "image": {"kernel": {"path": "vmlinuz"}, "initrd": {"path": "initrd.img"}}}}


async def _read_through_operator_session(namespace: str) -> tuple[dict, dict]:
    """kopf's own listing and the first event of its own watch stream, in the operator's session."""
    logger = logging.getLogger("test")
    settings = kopf.OperatorSettings()
    session = await apisession.login(logger=logger, settings=settings)
    vault = credentials.Vault()
    await vault.populate({"operator": session})
    token = auth.vault_var.set(vault)
    try:
        url = f"/apis/{G}/{V}/namespaces/{namespace}/{P}"
        listing = await kopf_api.get(url, settings=settings, logger=logger)
        stream = kopf_api.stream(f"{url}?watch=true&timeoutSeconds=10", settings=settings, logger=logger)
        try:
            event = await asyncio.wait_for(anext(stream), 30)
        finally:
            await stream.aclose()
        return listing, event
    finally:
        auth.vault_var.reset(token)
        await vault.close()


def test_kopfs_listing_and_watch_stream_carry_no_managed_fields(mikrom_cluster, operator_kubeconfig, kube_api,
                                                                namespace, monkeypatch):
    custom = client.CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(G, V, namespace, P, _manifest("slim"), _request_timeout=(5, 30))
    stored = custom.get_namespaced_custom_object(G, V, namespace, P, "slim", _request_timeout=(5, 30))
    assert stored["metadata"].get("managedFields")  # the API server keeps them and sends them

    # kopf's login reads the kubeconfig into the client library's process-wide default: put it back after
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)
    # (the operator reads $KUBECONFIG, which the client library takes in at import)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(operator_kubeconfig))
    listing, event = asyncio.run(_read_through_operator_session(namespace))

    [listed] = listing["items"]
    assert listed["metadata"]["uid"] == stored["metadata"]["uid"]
    assert event["type"] == "ADDED" and event["object"]["metadata"]["uid"] == stored["metadata"]["uid"]
    for obj in (listed, event["object"]):
        assert "managedFields" not in obj["metadata"]
        # the rest of the object is as stored
        assert obj["metadata"]["labels"] == {"app": "web"} and obj["spec"] == stored["spec"]
        assert obj["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
