"""kopf's HTTP session to the API server, with a bounded connection pool.

kopf's own login opens its aiohttp session with an unlimited pool (`TCPConnector(limit=0)`): each
request in flight gets a connection of its own, and each TLS connection holds a read buffer of
128 KiB or more. A burst of 1,000 new MicroVMs (kopf patches each one's finalizer and progress
annotations concurrently) opened over a thousand connections and left the operator's memory
that much larger after the burst (Python's allocator keeps what it once held). Here kopf logs in
as before (its `login_via_client`, from the same kubeconfig or in-cluster ServiceAccount as the
synchronous client) and gets a session whose pool holds at most `API_CONNECTIONS`: further
requests wait for a free connection, which on loopback or a cluster network costs far less than a
new TLS handshake. The watch streams hold one connection each, so the bound is well above them.

The session also parses what it reads without `metadata.managedFields` (`slimbodies`).
"""

from __future__ import annotations

import aiohttp
import kopf

from . import slimbodies

API_CONNECTIONS = 32
"""Connections kopf may hold open to the API server at once (its watch streams included)."""


async def login(**kwargs) -> kopf.AiohttpSession | None:
    """kopf's login handler: kopf's own credentials, in a session with a bounded pool."""
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    slimbodies.install()  # before the first watch stream, which needs this login
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=API_CONNECTIONS, ssl=info.as_ssl_context(),
                                       enable_cleanup_closed=True),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env,
        response_class=slimbodies.SlimResponse)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration)
