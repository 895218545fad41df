"""Admission: one step for every way in. It identifies the client once (from the request head, before any body
byte is read), checks the model it names against its allowlist, and admits the request into its budget.

Client keys are active only when configured; then every proxied request must carry one, as
`Authorization: Bearer`, `api-key`, or (forward proxy) `Proxy-Authorization` (Bearer, or Basic with the key as
password), and azproxy's client keys are never forwarded. A client address that fails too many key checks is
answered 429 for a while (`guessing.py`), before any key is compared.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

from .clients import Client, find_client
from .config import Settings
from .edge.arrival import Arrival, ArrivalKind, Passage
from .errors import Forbidden, ProxyAuthRequired, Unauthorized
from .guessing import Clock, GuessingGuard
from .headers import KEY_SUBPROTOCOL
from .ratelimit import RateLimiter, Usage
from .usage import Metered

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request let in: who sent it and, for a client with limits, its standing in the current window."""

    client: Client | None
    budget: Usage | None = None

    def headers(self) -> Mapping[str, str] | None:
        """OpenAI's x-ratelimit-* headers for the client's own limits."""
        return self.budget.headers() if self.budget is not None else None


class Admission:
    def __init__(self, settings: Settings, limiter: RateLimiter, *, clock: Clock = time.monotonic) -> None:
        self._clients = settings.access.clients
        self._proxy_auth = settings.forward.proxy_auth
        self._limiter = limiter
        access = settings.access
        self._guessing = GuessingGuard(access.auth_failure_limit, access.trusted_proxies, clock=clock)
        #: Token charges under way (Redis may be slow); referenced so none is collected mid-flight.
        self._charges: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    def identify(self, arrival: Arrival, headers: CIMultiDictProxy[str], peer: str | None) -> Client | None:
        """The client, None when client keys are off; 407 or 401 when a credential is needed and none fits,
        and 429 for an address (`peer`, or whom a trusted proxy names) that failed too often."""
        address = self._guessing.client_address(peer, headers)
        self._guessing.check(address)
        try:
            return self._identify(arrival, headers)
        except (Unauthorized, ProxyAuthRequired):
            if client_key(headers) or headers.get("Proxy-Authorization"):
                self._guessing.failed(address)  # a missing credential is no guess
            raise

    def _identify(self, arrival: Arrival, headers: CIMultiDictProxy[str]) -> Client | None:
        if arrival.kind in (ArrivalKind.FORWARD, ArrivalKind.CONNECT):
            self._check_proxy_auth(headers)
        if not self._clients:
            return None
        if arrival.kind is ArrivalKind.FORWARD and arrival.passage is Passage.RELAY:
            return self._by_proxy_key(headers)
        for key in (client_key(headers), proxy_key(headers)):
            if key:
                client = find_client(self._clients, key)
                if client is not None:
                    return client
        if arrival.tunnel_client is not None:
            return arrival.tunnel_client  # inside a tunnel, the key its CONNECT presented is the identity
        raise Unauthorized(
            "Incorrect or missing API key for azproxy. Send an azproxy client key as 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
        )

    async def admit(self, client: Client | None, model: str | None) -> Admitted:
        """The allowlist, then the request budget (429 with retry-after when the window is spent)."""
        if client is None:
            return Admitted(None)
        self.check_model(client, model)
        if not (client.rpm or client.tpm):
            return Admitted(client)
        return Admitted(client, await self._limiter.admit(client))

    @staticmethod
    def check_model(client: Client, model: str | None, deployments: Mapping[str, str] | None = None) -> None:
        """403 unless the client may use `model`; with `deployments` (the model map), a deployment name counts
        as the models that map to it (batch files name deployments)."""
        if client.may_use(model):
            return
        allowed = client.models or frozenset()
        if deployments is not None and any(deployments.get(name, name) == model for name in allowed):
            return
        raise Forbidden(
            f"Client '{client.name}' may not use model '{model}'.", param="model", code="model_not_allowed"
        )

    def charge(self, metered: Metered) -> None:
        """Usage observer: the tokens an answer used count against its client's per-minute budget."""
        client, tokens = metered.client, metered.usage.total
        if client is None or not client.tpm or not tokens:
            return
        task = asyncio.get_running_loop().create_task(self._limiter.charge(client, tokens))
        self._charges.add(task)
        task.add_done_callback(self._charges.discard)

    def _by_proxy_key(self, headers: CIMultiDictProxy[str]) -> Client:
        """For requests relayed unchanged to another host: only Proxy-Authorization may carry the azproxy key,
        because `Authorization` belongs to that host and is passed on to it."""
        key = proxy_key(headers)
        client = find_client(self._clients, key) if key else None
        if client is None:
            raise ProxyAuthRequired(
                "azproxy needs a client key in Proxy-Authorization (Basic, with the key as password) "
                "to relay to this host."
            )
        return client

    def _check_proxy_auth(self, headers: CIMultiDictProxy[str]) -> None:
        """407 unless Proxy-Authorization carries the configured `user:password` (compared in constant time)
        or, with client keys on, a client key as the password: then `HTTPS_PROXY=http://any:KEY@host` alone
        satisfies both."""
        if self._proxy_auth is None:
            return
        offered = basic_credentials(headers) or ""
        if hmac.compare_digest(offered.encode(), self._proxy_auth.reveal().encode()):
            return
        key = proxy_key(headers)
        if key and self._clients and find_client(self._clients, key) is not None:
            return
        raise ProxyAuthRequired("azproxy needs proxy credentials: Proxy-Authorization: Basic user:password.")


def client_key(headers: CIMultiDictProxy[str]) -> str | None:
    """`Authorization: Bearer KEY`, `api-key: KEY`, or (browsers opening a realtime WebSocket, which cannot set
    headers) the subprotocol `openai-insecure-api-key.KEY`."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    key = headers.get("api-key")
    if key:
        return key
    for protocol in headers.get("Sec-WebSocket-Protocol", "").split(","):
        if protocol.strip().startswith(KEY_SUBPROTOCOL):
            return protocol.strip().removeprefix(KEY_SUBPROTOCOL) or None
    return None


def proxy_key(headers: CIMultiDictProxy[str]) -> str | None:
    """A client key in Proxy-Authorization: `Bearer KEY`, or `Basic` with the key as password (any user)."""
    scheme, _, credential = headers.get("Proxy-Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credential.strip() or None
    basic = basic_credentials(headers)
    return basic.partition(":")[2] or None if basic else None


def basic_credentials(headers: CIMultiDictProxy[str]) -> str | None:
    """The decoded `user:password` of `Proxy-Authorization: Basic ...`, or None."""
    scheme, _, encoded = headers.get("Proxy-Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
