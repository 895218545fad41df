"""The models the Azure resources themselves report, for `/v1/models`: each backend's deployments asked on the
data plane and merged, cached for a few minutes, and never a reason to fail the request (the mapper's models are
always listed)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from typing import Final

from .backends import Backend
from .config import Mode
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
        backends = [backend for backend in self._upstream.backends if backend.kind is Mode.AZURE]
        shared = all(backend.credential is not None for backend in backends)
        key = None if shared else client_key
        slot = hashlib.sha256((key or "").encode()).hexdigest()
        cached = self._cache.get(slot)
        if cached is not None and cached[0] > time.monotonic():
            self._cache.move_to_end(slot)
            return cached[1]
        reports = await asyncio.gather(*(self._models_of(backend, key) for backend in backends))
        names = tuple(sorted(set().union(*reports)))
        self._cache[slot] = (time.monotonic() + (self._ttl if names else self._retry), names)
        self._cache.move_to_end(slot)
        while len(self._cache) > self._max_entries:
            self._cache.popitem(last=False)
        return names

    async def _models_of(self, backend: Backend, key: str | None) -> set[str]:
        """A backend's deployments, and the model names it serves them under (`[[model]]`, the mapper)."""
        models: dict[str, list[str]] = {}
        for model, deployment in backend.model_map.items():
            if backend.serves(model):
                models.setdefault(deployment, []).append(model)
        deployments = _deployment_ids(await self._upstream.fetch_json(LISTING_PATH, key, backend))
        return set(deployments).union(*(models.get(deployment, ()) for deployment in deployments))


def _deployment_ids(document: object) -> tuple[str, ...]:
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        return ()
    return tuple(
        sorted({str(item["id"]) for item in document["data"] if isinstance(item, dict) and "id" in item})
    )
