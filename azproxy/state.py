"""What every handler shares, stored on the application under a typed key."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .access import Admission
from .config import Settings
from .edge.tunnel import Tunnels
from .listing import DeploymentListing
from .ratelimit import RateLimiter
from .resolver import Resolver
from .upstream import UpstreamClient
from .usage import UsageObservers


class ProxyState:
    __slots__ = (
        "_certificate_authority",
        "admission",
        "limiter",
        "listing",
        "resolver",
        "settings",
        "tunnels",
        "upstream",
        "usage",
    )

    def __init__(
        self, settings: Settings, upstream: UpstreamClient, resolver: Resolver, limiter: RateLimiter
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.resolver = resolver
        self.limiter = limiter
        self.admission = Admission(settings, limiter)
        #: Told the token usage of every answer: rate limits now, whatever else subscribes.
        self.usage = UsageObservers()
        self.usage.add(self.admission.charge)
        self.listing = DeploymentListing(upstream)
        self.tunnels = Tunnels(settings.limits.header_timeout)
        self._certificate_authority: CertificateAuthority | None = None

    def certificate_authority(self) -> CertificateAuthority:
        """The local CA, loaded or created on first need (the first intercepted tunnel); `cryptography` is
        imported only then, which keeps a reverse-proxy-only process about 8 MB smaller."""
        if self._certificate_authority is None:
            from .edge.certs import CertificateAuthority

            forward = self.settings.forward
            self._certificate_authority = CertificateAuthority(
                self.settings.state_dir, forward.intercept_hosts
            )
        return self._certificate_authority


if TYPE_CHECKING:
    from .edge.certs import CertificateAuthority

STATE = web.AppKey("azproxy_state", ProxyState)
