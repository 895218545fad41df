"""Server-side credentials for upstream calls: a fixed key, or a Microsoft Entra ID token kept fresh.

An Entra token is fetched once and reused until shortly before it expires; concurrent requests during a refresh
wait for the one fetch under way. The client's own key is never needed (and never forwarded) with either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol

from .config import Secret
from .errors import BadGateway

log = logging.getLogger(__name__)

COGNITIVE_SERVICES_SCOPE: Final = "https://cognitiveservices.azure.com/.default"


class Credential(Protocol):
    async def headers(self) -> Mapping[str, str]:
        """The headers that authenticate one upstream request."""
        ...

    async def close(self) -> None: ...


class ApiKey:
    """A resource key, sent as `api-key` (Azure; or the header API Management expects) or as a bearer (OpenAI)."""

    def __init__(self, key: Secret, *, as_bearer: bool = False, header: str = "api-key") -> None:
        value = key.reveal()
        self._headers = {"Authorization": f"Bearer {value}"} if as_bearer else {header: value}

    async def headers(self) -> Mapping[str, str]:
        return self._headers

    async def close(self) -> None:
        return None


class TokenSource(Protocol):
    """What azure-identity's async credentials offer: `get_token(scope)` returning `.token`, `.expires_on`."""

    async def get_token(self, *scopes: str) -> Any: ...

    async def close(self) -> None: ...


class EntraToken:
    """A bearer token for Azure OpenAI from `source`, cached and refreshed `margin` seconds before it expires."""

    def __init__(
        self, source: TokenSource, *, scope: str = COGNITIVE_SERVICES_SCOPE, margin: float = 300
    ) -> None:
        self._source = source
        self._scope = scope
        self._margin = margin
        self._token = ""
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def headers(self) -> Mapping[str, str]:
        if time.time() >= self._expires_on - self._margin:
            await self._refresh()
        return {"Authorization": f"Bearer {self._token}"}

    async def _refresh(self) -> None:
        async with self._lock:
            if time.time() < self._expires_on - self._margin:
                return  # another request refreshed it while this one waited
            try:
                access = await self._source.get_token(self._scope)
            except Exception as exc:  # azure-identity raises many kinds; none may leak details or a traceback
                if time.time() < self._expires_on:
                    log.warning(
                        "Entra ID token refresh failed (%s); using the current token", type(exc).__name__
                    )
                    return
                log.error("Entra ID sign-in failed: %s", type(exc).__name__)
                raise BadGateway(
                    "azproxy could not sign in to Azure with Microsoft Entra ID; see its log.",
                    code="upstream_auth_failed",
                ) from None
            self._token, self._expires_on = str(access.token), float(access.expires_on)

    async def close(self) -> None:
        await self._source.close()


def default_entra_token() -> EntraToken:
    """DefaultAzureCredential: managed identity, workload identity, service principal variables, Azure CLI."""
    from azure.identity.aio import DefaultAzureCredential

    return EntraToken(DefaultAzureCredential())
