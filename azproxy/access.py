"""Access control: which client sent a request, and whether it may use the model it names.

Active only when client keys are configured; then every proxied request must carry one, as
`Authorization: Bearer`, `api-key`, or (forward proxy) `Proxy-Authorization` (Bearer, or Basic with the key as
password), and azproxy's client keys are never forwarded.
"""

from __future__ import annotations

import base64
import binascii

from multidict import CIMultiDictProxy

from .clients import Client, find_client
from .errors import Forbidden, ProxyAuthRequired, Unauthorized
from .translate import client_key


class AccessControl:
    def __init__(self, clients: tuple[Client, ...]) -> None:
        self.clients = clients

    @property
    def enabled(self) -> bool:
        return bool(self.clients)

    def identify_by_proxy_key(self, headers: CIMultiDictProxy[str]) -> Client | None:
        """For requests relayed unchanged to another host: only Proxy-Authorization may carry the azproxy key,
        because `Authorization` belongs to that host and is passed on to it."""
        if not self.clients:
            return None
        key = proxy_key(headers)
        client = find_client(self.clients, key) if key else None
        if client is None:
            raise ProxyAuthRequired(
                "azproxy needs a client key in Proxy-Authorization (Basic, with the key as password) "
                "to relay to this host."
            )
        return client

    def identify(self, headers: CIMultiDictProxy[str], tunnel_client: Client | None = None) -> Client | None:
        """The client, None when access control is off; 401 when a key is needed and none matches."""
        if not self.clients:
            return None
        for key in (client_key(headers), proxy_key(headers)):
            if key:
                client = find_client(self.clients, key)
                if client is not None:
                    return client
        if tunnel_client is not None:
            return tunnel_client  # inside a tunnel, the key its CONNECT presented is the identity
        raise Unauthorized(
            "Incorrect or missing API key for azproxy. Send an azproxy client key as 'Authorization: Bearer KEY'.",
            code="invalid_api_key",
        )

    @staticmethod
    def check_model(client: Client | None, model: str | None) -> None:
        if client is not None and not client.may_use(model):
            raise Forbidden(
                f"Client '{client.name}' may not use model '{model}'.",
                param="model",
                code="model_not_allowed",
            )


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
