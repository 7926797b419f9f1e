"""The worker's real API client, noting every request it makes (method, path, query), for tests
that count what the worker's code asks of the API server."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest
from kubernetes import client, config

from mikrom import kube


class RecordingApiClient(client.ApiClient):
    """A real API client that also notes every request's method, path and query."""

    def __init__(self, configuration):
        super().__init__(configuration)
        self.requests: list[tuple[str, str, dict]] = []
        send = self.rest_client.request

        def request(method, url, *args, **kwargs):
            parts = urlsplit(url)
            self.requests.append((method, parts.path, dict(parse_qsl(parts.query))))
            return send(method, url, *args, **kwargs)

        self.rest_client.request = request


@pytest.fixture
def worker_api(worker_kubeconfig):
    """mikrom.kube's client, logged in as the worker's ServiceAccount and recording its requests."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(worker_kubeconfig), client_configuration=cfg)
    api = RecordingApiClient(cfg)
    kube.set_api(api)
    yield api
    kube.set_api(None)
    api.close()
