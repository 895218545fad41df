"""The deployments the Azure resource itself reports, for `/v1/models`: asked on the data plane, cached for a
few minutes, and never a reason to fail the request (the mapper's models are always listed)."""

from __future__ import annotations

import hashlib
import time
from typing import Final

from .upstream import UpstreamClient

#: The last data-plane version that lists deployments; newer ones moved the listing to the management plane.
LISTING_PATH: Final = "/openai/deployments?api-version=2022-12-01"


class DeploymentListing:
    def __init__(self, upstream: UpstreamClient, ttl: float = 300, retry_after_failure: float = 60) -> None:
        self._upstream = upstream
        self._ttl = ttl
        self._retry = retry_after_failure
        #: Cached per credential: one client's key must not reveal another resource's deployments.
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}

    async def deployments(self, client_key: str | None) -> tuple[str, ...]:
        slot = hashlib.sha256((client_key or "").encode()).hexdigest()
        cached = self._cache.get(slot)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        document = await self._upstream.fetch_json(LISTING_PATH, client_key)
        names = _deployment_ids(document)
        self._cache[slot] = (time.monotonic() + (self._ttl if names else self._retry), names)
        return names


def _deployment_ids(document: object) -> tuple[str, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return ()
    return tuple(
        sorted({str(item["id"]) for item in document["data"] if isinstance(item, dict) and "id" in item})
    )
