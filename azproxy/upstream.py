"""The client side: one pooled ClientSession for the process, and sending a request to the backends routing
picks, failing over while no answer has started: a connect error, a timeout before the answer, a 429 or a 5xx
send the same request (its body is in memory) to the next backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import hdrs

from .backends import Backend
from .config import Failover, Timeouts
from .connections import Answer, Connections
from .errors import BadGateway, GatewayTimeout, ProxyError
from .resolver import AiohttpResolver
from .routing import ATTEMPTS_HEADER, BACKEND_HEADER, Router, Target
from .translate import UpstreamRequest

log = logging.getLogger(__name__)

#: The translator bound to one request: the exact request for a backend, given its server-side auth headers
#: (None: the client's own key is forwarded). The client calls it once per backend it tries.
Translation = Callable[[Backend, Mapping[str, str] | None], UpstreamRequest]

# aiohttp adds these on its own; a proxy must send only what the client sent (an unasked-for gzip answer would
# reach a client that cannot read it, since bodies are relayed undecoded).
_NO_AUTO_HEADERS = frozenset({hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE})
#: Answers that say "not now, not here": the next backend may do better.
_FAILING: Final = frozenset({500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Sent:
    """An answer at its status line, the backend that gave it and how many backends were tried for it."""

    response: Answer
    backend: Backend
    attempts: int

    def headers(self, enabled: bool = True) -> dict[str, str]:
        """`x-azproxy-backend` and `x-azproxy-attempts` for the client (none when turned off)."""
        if not enabled:
            return {}
        return {BACKEND_HEADER: self.backend.name, ATTEMPTS_HEADER: str(self.attempts)}


class UpstreamClient:
    """Owns the connection pool and the router; created once at start-up, closed at shutdown. Proxied requests
    go through `Connections`; the ClientSession serves WebSocket bridges and azproxy's own small GETs."""

    def __init__(
        self,
        backends: Sequence[Backend],
        timeouts: Timeouts,
        resolver: AiohttpResolver,
        failover: Failover | None = None,
    ) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = tuple(backends)
        self.router = Router(self.backends, failover or Failover())
        self._resolver = resolver
        self._timeouts = timeouts
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._session: aiohttp.ClientSession | None = None
        self._connections = Connections(resolver)
        #: Told each attempt's backend and outcome (metrics); None: nobody listens.
        self.on_attempt: Callable[[str, str], None] | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, resolver=self._resolver)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_NO_AUTO_HEADERS,
        )

    async def close(self) -> None:
        await self._connections.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        credentials = {id(b.credential): b.credential for b in self.backends if b.credential is not None}
        for credential in credentials.values():  # one credential may serve several backends
            await credential.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        return self._session

    async def prepare(self, translation: Translation, target: Target | None = None) -> UpstreamRequest:
        """The request for the backend routing picks, for callers that speak to it themselves (WebSocket
        bridging); such a call reports nothing back, so it is never a circuit's probe."""
        target = target or Target()
        backend = self.router.next(target)
        if backend is None:
            raise self.router.unavailable(target)
        self.router.abandoned(backend)
        request = translation(backend, await _credential_headers(backend))
        request.headers.popall(BACKEND_HEADER, None)
        return request

    async def fetch_json(
        self, path: str, client_key: str | None, backend: Backend | None = None
    ) -> object | None:
        """GET `path` (with query) on `backend` (the primary by default), with the server credential or else
        `client_key`; None on any failure: callers use this for optional extras and fall back to what they know."""
        backend = backend or self.router.primary
        credential = await _credential_headers(backend)
        if credential is None:
            if not client_key:
                return None
            credential = {backend.api_key_header: client_key}
        try:
            async with self.session.get(
                backend.origin + path, headers=credential, timeout=aiohttp.ClientTimeout(total=5)
            ) as response:
                if response.status != 200:
                    return None
                document: object = await response.json(content_type=None)
                return document
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def send(
        self,
        translation: Translation,
        target: Target | None = None,
        backends: Sequence[Backend] | None = None,
    ) -> Sent:
        """The answer of the first backend that gives a usable one, at its status line; the caller owns its
        response and must release or close it.

        Backends come from routing for `target`, failing over on connect errors, timeouts, 429 and 5xx, up to
        the attempt limit; when all fail, the last answer received, else 502 or 504; when none may be tried,
        429 or 503 at once. `backends` instead tries exactly these, in turn, without routing (relayed hosts).
        A cancelled request (the client left) closes its upstream request and starts no other.
        """
        if backends is not None:
            return await self._send_in_turn(translation, backends)
        target = target or Target()
        router = self.router
        limit = router.limit(target)
        tried: list[str] = []
        last: Sent | None = None
        failure: ProxyError | None = None
        try:
            while len(tried) < limit:
                backend = router.next(target, tried)
                if backend is None:
                    break
                tried.append(backend.name)
                try:
                    response = await self._attempt(translation, backend)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    router.failed(backend)
                    failure = _failure(backend, exc)
                    self._note_attempt(backend, failure)
                    continue
                except BaseException:
                    router.abandoned(backend)
                    raise
                if last is not None:
                    last.response.close()
                last = Sent(response, backend, len(tried))
                self._note_attempt(backend, response.status)
                if response.status == 429:
                    router.throttled(backend, target.model, response.headers)
                elif response.status in _FAILING:
                    router.failed(backend)
                    log.warning("backend %s (%s) answered %d", backend.name, backend.host, response.status)
                else:
                    router.answered(backend)
                    return last
        except BaseException:
            if last is not None:
                last.response.close()
            raise
        if last is not None:
            return last
        if failure is not None:
            raise failure
        raise router.unavailable(target)

    async def _send_in_turn(self, translation: Translation, backends: Sequence[Backend]) -> Sent:
        """The first of `backends` that answers at all, whatever its status."""
        failure: ProxyError | None = None
        for attempt, backend in enumerate(backends, 1):
            try:
                return Sent(await self._attempt(translation, backend), backend, attempt)
            except (TimeoutError, aiohttp.ClientError) as exc:
                failure = _failure(backend, exc)
        assert failure is not None
        raise failure

    def _note_attempt(self, backend: Backend, outcome: int | ProxyError) -> None:
        """Tells `on_attempt` (metrics) how one attempt went: ok, 429, 5xx, timeout or unreachable."""
        if self.on_attempt is None:
            return
        if isinstance(outcome, ProxyError):
            label = "timeout" if outcome.code == "upstream_timeout" else "unreachable"
        else:
            label = "429" if outcome == 429 else "5xx" if outcome in _FAILING else "ok"
        self.on_attempt(backend.name, label)

    async def _attempt(self, translation: Translation, backend: Backend) -> Answer:
        """One request to one backend, bounded by its timeouts: connect, then the answer's first byte; once the
        answer has started, only the gap between two chunks."""
        request = translation(backend, await _credential_headers(backend))
        request.headers.popall(BACKEND_HEADER, None)
        timeouts = self._timeouts
        first_byte = backend.first_byte_timeout or timeouts.first_byte or timeouts.read
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        answer = await self._connections.request(
            request.method,
            request.url,
            request.headers,
            request.body,
            connect_timeout=backend.connect_timeout or timeouts.connect,
            first_byte_timeout=first_byte,
        )
        answer.set_idle_timeout(backend.idle_timeout or timeouts.read)
        return answer


def _failure(backend: Backend, exc: BaseException) -> ProxyError:
    """502 or 504 in OpenAI's shape, logged with the backend's name and host (never a key)."""
    failure: ProxyError
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        failure = GatewayTimeout(f"Backend '{backend.name}' did not answer in time.", code="upstream_timeout")
    else:
        failure = BadGateway(
            f"Backend '{backend.name}' could not be reached ({type(exc).__name__}).",
            code="upstream_unreachable",
        )
    log.warning("backend %s (%s) failed: %s", backend.name, backend.host, failure.message)
    return failure


async def _credential_headers(backend: Backend) -> Mapping[str, str] | None:
    """The backend's server-side auth headers; None means the client's own key is to be used."""
    return await backend.credential.headers() if backend.credential is not None else None
