"""Name resolution for every upstream connection (pooled client and blind tunnels alike).

One place to resolve means one place to vet the addresses actually connected to, and lets tests map public
host names to loopback listeners without DNS.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

from aiohttp.abc import AbstractResolver, ResolveResult

from .addresses import is_public
from .errors import Forbidden

Endpoint = tuple[str, int]


class Resolver:
    """getaddrinfo, unless `overrides` maps the (host, port) asked for to a fixed (address, port)."""

    def __init__(self, overrides: Mapping[Endpoint, Endpoint] | None = None) -> None:
        self._overrides = dict(overrides or {})

    async def resolve(self, host: str, port: int, *, public_only: bool = False) -> list[Endpoint]:
        """The addresses to connect to; with `public_only`, non-public ones are dropped and none left is a 403.

        Callers connect to exactly these addresses, so what was vetted is what is reached (no rebinding window).
        """
        override = self._overrides.get((host, port))
        if override is not None:
            endpoints = [override]
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
            endpoints = list(dict.fromkeys((str(info[4][0]), int(info[4][1])) for info in infos))
        if public_only:
            endpoints = [endpoint for endpoint in endpoints if is_public(endpoint[0])]
            if not endpoints:
                raise Forbidden(
                    f"{host} resolves only to non-public addresses; azproxy does not connect there.",
                    code="target_not_public",
                )
        return endpoints

    def for_connector(self, public_only: bool, exempt: frozenset[str] = frozenset()) -> AiohttpResolver:
        return AiohttpResolver(self, public_only, exempt)


class AiohttpResolver(AbstractResolver):
    """Lets aiohttp's connector resolve through a `Resolver`, vetting addresses unless the host is exempt."""

    def __init__(self, resolver: Resolver, public_only: bool, exempt: frozenset[str]) -> None:
        self._resolver = resolver
        self._public_only = public_only
        self._exempt = exempt

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        vet = self._public_only and host not in self._exempt
        try:
            endpoints = await self._resolver.resolve(host, port, public_only=vet)
        except Forbidden as exc:
            raise OSError(exc.message) from None  # the client reports an unreachable backend (502)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=resolved_port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address, resolved_port in endpoints
        ]

    async def close(self) -> None:
        return None
