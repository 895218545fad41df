"""Name resolution for every upstream connection (pooled client and blind tunnels alike).

One place to resolve means one place to vet the addresses actually connected to, and lets tests map public
host names to loopback listeners without DNS.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from aiohttp.abc import AbstractResolver, ResolveResult

Endpoint = tuple[str, int]


class Resolver:
    """getaddrinfo, unless `overrides` maps the (host, port) asked for to a fixed (address, port)."""

    def __init__(self, overrides: Mapping[Endpoint, Endpoint] | None = None) -> None:
        self._overrides = dict(overrides or {})

    async def resolve(self, host: str, port: int) -> list[Endpoint]:
        override = self._overrides.get((host, port))
        if override is not None:
            return [override]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))


class AiohttpResolver(AbstractResolver):
    """Lets aiohttp's connector resolve through a `Resolver`."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=resolved_port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address, resolved_port in await self._resolver.resolve(host, port)
        ]

    async def close(self) -> None:
        return None
