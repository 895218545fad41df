"""What every handler shares: one snapshot per configuration, the live one stored on the application under a
typed key and pinned by each request as it arrives, so a reload never mixes two configurations in one request."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from aiohttp import web

from .access import Admission
from .browser import BrowserPolicy
from .config import Settings
from .edge.aiohttp_seam import request_key
from .edge.tunnel import Tunnels
from .errors import ServiceUnavailable
from .listing import DeploymentListing
from .owners import OwnerStore, RedisOwners, SqliteOwners
from .ratelimit import RateLimiter
from .resolver import Resolver
from .tenancy import Tenancy
from .upstream import UpstreamClient
from .usage import UsageObservers

log = logging.getLogger(__name__)


class BodyBudget:
    """Bytes of request bodies being read right now, across all connections, against AZPROXY_MAX_BUFFERED:
    without it, many clients each sending up to AZPROXY_MAX_BODY could together hold any amount of memory."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        """Take `size` bytes if they fit under the limit; False (and nothing taken) when they do not."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


class ProxyState:
    """One configuration's view of everything a request uses, built from one Settings and never changed after.

    What must outlive a reload is handed on from the snapshot it replaces (`previous`): the rate limiter and its
    counters, the body budget, the open tunnels (their requests are recognised by it), the stored objects'
    owners, the local CA, and the usage observers others subscribed. The upstream pool, its backends and their
    cooldowns and circuits, client keys and browser rules are the snapshot's own."""

    __slots__ = (
        "_certificate_authority",
        "admission",
        "bodies",
        "browser",
        "limiter",
        "listing",
        "observers",
        "resolver",
        "settings",
        "tenancy",
        "tunnels",
        "upstream",
        "usage",
    )

    def __init__(
        self,
        settings: Settings,
        upstream: UpstreamClient,
        resolver: Resolver,
        limiter: RateLimiter,
        previous: ProxyState | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.resolver = resolver
        self.limiter = limiter
        self.admission = Admission(settings, limiter)
        self.browser = BrowserPolicy.from_settings(settings)
        #: Whoever subscribes to token usage (tests, embedding programs), kept across reloads.
        self.observers: UsageObservers = previous.observers if previous is not None else UsageObservers()
        #: Told the token usage of every answer: this snapshot's rate limits, then the subscribers.
        self.usage = UsageObservers()
        self.usage.add(self.admission.charge)
        self.usage.add(self.observers.observe)
        self.listing = DeploymentListing(upstream)
        self.tunnels: Tunnels = (
            previous.tunnels if previous is not None else Tunnels(settings.limits.header_timeout)
        )
        self.bodies: BodyBudget = (
            previous.bodies if previous is not None else BodyBudget(settings.limits.max_buffered)
        )
        #: Client keys as tenants of the stored objects; None (nothing checked or stored) without client keys.
        self.tenancy: Tenancy | None = None
        if settings.access.clients:
            kept = previous.tenancy if previous is not None else None
            self.tenancy = kept if kept is not None else Tenancy(owner_store(settings))
        self._certificate_authority: CertificateAuthority | None = (
            previous._certificate_authority if previous is not None else None
        )

    def certificate_authority(self) -> CertificateAuthority:
        """The local CA, loaded or created on first need (the first intercepted tunnel); `cryptography` is
        imported only then, which keeps a reverse-proxy-only process about 8 MB smaller."""
        if self._certificate_authority is None:
            from .edge.certs import CertificateAuthority, CertificateError

            forward = self.settings.forward
            try:
                self._certificate_authority = CertificateAuthority(
                    self.settings.state_dir, forward.intercept_hosts
                )
            except CertificateError as error:
                log.error(
                    "cannot intercept tunnels: %s", error
                )  # the operator's to fix; no traceback per CONNECT
                raise ServiceUnavailable(
                    "azproxy cannot make certificates for intercepted tunnels now; its log says why.",
                    code="certificate_unavailable",
                ) from None
        return self._certificate_authority


class LiveState:
    """The snapshot new requests get, replaced whole by a reload. Each request pins the snapshot current when it
    arrived and unpins it when its handler is done; a replaced snapshot's upstream pool is closed once its last
    request is, so streams under way finish on the configuration they started with."""

    __slots__ = ("_closing", "_users", "current")

    def __init__(self, current: ProxyState) -> None:
        self.current = current
        #: Requests under way, per snapshot that has any.
        self._users: dict[ProxyState, int] = {}
        #: Replaced pools being closed; referenced so none is collected mid-close.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def upstream(self) -> UpstreamClient:
        """The current snapshot's upstream, for what asks outside any request (readiness, metrics, tests)."""
        return self.current.upstream

    @property
    def bodies(self) -> BodyBudget:
        """The one budget of request bodies being read, whatever configuration reads them."""
        return self.current.bodies

    @property
    def usage(self) -> UsageObservers:
        """Where to subscribe to every answer's token usage, whatever configuration served it."""
        return self.current.observers

    def pin(self) -> ProxyState:
        state = self.current
        self._users[state] = self._users.get(state, 0) + 1
        return state

    def unpin(self, state: ProxyState) -> None:
        left = self._users[state] - 1
        if left:
            self._users[state] = left
            return
        del self._users[state]
        if state is not self.current:
            self._close_soon(state)

    async def swap(self, state: ProxyState) -> None:
        """Make `state` the one new requests get; the replaced one closes when no request uses it any more."""
        await state.upstream.start()
        replaced, self.current = self.current, state
        if replaced not in self._users:
            self._close_soon(replaced)

    async def close(self) -> None:
        """At shutdown, after the requests drained: every pool still open, and the rate limiter."""
        if self._closing:
            await asyncio.gather(*self._closing)
        for state in {self.current, *self._users}:
            await state.upstream.close()
        await self.current.limiter.close()

    def _close_soon(self, state: ProxyState) -> None:
        task = asyncio.get_running_loop().create_task(state.upstream.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


def owner_store(settings: Settings) -> OwnerStore:
    """Redis when several hosts share AZPROXY_REDIS_URL, else a SQLite file in the state directory."""
    if settings.access.redis_url:
        return RedisOwners(settings.access.redis_url)
    return SqliteOwners(settings.state_dir)


if TYPE_CHECKING:
    from .edge.certs import CertificateAuthority

STATE = web.AppKey("azproxy_state", LiveState)

SNAPSHOT: Final = request_key("azproxy_snapshot", ProxyState)


def state_of(request: web.Request) -> ProxyState:
    """The configuration this request is served with from start to end: the snapshot it pinned, or for a request
    answered before the edge saw it (a handler mounted alone, an answer aiohttp makes itself) the current one."""
    state: ProxyState | None = request.get(SNAPSHOT)
    return state if state is not None else request.app[STATE].current
