"""What every handler shares, stored on the application under a typed key."""

from __future__ import annotations

from aiohttp import web

from .access import AccessControl
from .config import Settings
from .edge.certs import CertificateAuthority
from .edge.tunnel import Tunnels
from .ratelimit import RateLimiter
from .resolver import Resolver
from .upstream import UpstreamClient


class ProxyState:
    __slots__ = ("_certificate_authority", "access", "limiter", "resolver", "settings", "tunnels", "upstream")

    def __init__(
        self, settings: Settings, upstream: UpstreamClient, resolver: Resolver, limiter: RateLimiter
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.resolver = resolver
        self.limiter = limiter
        self.access = AccessControl(settings.access.clients)
        self.tunnels = Tunnels()
        self._certificate_authority: CertificateAuthority | None = None

    def certificate_authority(self) -> CertificateAuthority:
        """The local CA, loaded or created on first need (the first intercepted tunnel)."""
        if self._certificate_authority is None:
            forward = self.settings.forward
            self._certificate_authority = CertificateAuthority(
                self.settings.state_dir, forward.intercept_hosts
            )
        return self._certificate_authority


STATE = web.AppKey("azproxy_state", ProxyState)
