"""The deployments the Azure resource itself reports, for `/v1/models`: asked on the data plane, cached for a
few minutes, and never a reason to fail the request (the mapper's models are always listed)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import Final

from .upstream import UpstreamClient

#: The last data-plane version that lists deployments; newer ones moved the listing to the management plane.
LISTING_PATH: Final = "/openai/deployments?api-version=2022-12-01"


class DeploymentListing:
    """Cached per credential (one client's key must not reveal another's resource), in a bounded LRU so that
    callers with ever-new keys cannot grow it or make azproxy ask Azure more than once per key and period."""

    def __init__(
        self,
        upstream: UpstreamClient,
        ttl: float = 300,
        retry_after_failure: float = 60,
        max_entries: int = 256,
    ) -> None:
        self._upstream = upstream
        self._ttl = ttl
        self._retry = retry_after_failure
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()

    async def deployments(self, client_key: str | None) -> tuple[str, ...]:
        """With a server-side credential the client's key plays no part, so all callers share one entry."""
        key = None if self._upstream.backends[0].credential is not None else client_key
        slot = hashlib.sha256((key or "").encode()).hexdigest()
        cached = self._cache.get(slot)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(slot)
            return cached[1]
        names = _deployment_ids(await self._upstream.fetch_json(LISTING_PATH, key))
        self._cache[slot] = (time.monotonic() + (self._ttl if names else self._retry), names)
        self._cache.move_to_end(slot)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return names


def _deployment_ids(document: object) -> tuple[str, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return ()
    return tuple(
        sorted({str(item["id"]) for item in document["data"] if isinstance(item, dict) and "id" in item})
    )
