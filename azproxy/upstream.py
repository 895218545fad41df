"""The client side: one pooled ClientSession for the process, and sending a plan to the backends in turn."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Mapping, Sequence

import aiohttp
from aiohttp import hdrs

from .backends import Backend
from .config import Timeouts
from .errors import BadGateway, GatewayTimeout, ProxyError
from .resolver import AiohttpResolver
from .translate import UpstreamRequest

log = logging.getLogger(__name__)

#: The translator bound to one request: the exact request for a backend, given its server-side auth headers
#: (None: the client's own key is forwarded). The client calls it once per backend it tries.
Translation = Callable[[Backend, Mapping[str, str] | None], UpstreamRequest]

# aiohttp adds these on its own; a proxy must send only what the client sent (an unasked-for gzip answer would
# reach a client that cannot read it, since bodies are relayed undecoded).
_NO_AUTO_HEADERS = frozenset({hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE})
_LARGE_BODY = 1024 * 1024


class UpstreamClient:
    """Owns the connection pool; created once at start-up, closed at shutdown."""

    def __init__(self, backends: Sequence[Backend], timeouts: Timeouts, resolver: AiohttpResolver) -> None:
        if not backends:
            raise ValueError("at least one backend is needed")
        self.backends = tuple(backends)
        self._resolver = resolver
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.read
        )
        self._session: aiohttp.ClientSession | None = None

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
        if self._session is not None:
            await self._session.close()
            self._session = None
        for backend in self.backends:
            if backend.credential is not None:
                await backend.credential.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        return self._session

    async def prepare(self, translation: Translation) -> UpstreamRequest:
        """The request for the first backend, for callers that speak to it themselves (WebSocket bridging)."""
        backend = self.backends[0]
        return translation(backend, await _credential_headers(backend))

    async def fetch_json(self, path: str, client_key: str | None) -> object | None:
        """GET `path` (with query) on the first backend, with the server credential or else `client_key`;
        None on any failure: callers use this for optional extras and fall back to what they know."""
        backend = self.backends[0]
        credential = await _credential_headers(backend)
        if credential is None:
            if not client_key:
                return None
            credential = {"api-key": client_key}
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
        self, translation: Translation, backends: Sequence[Backend] | None = None
    ) -> aiohttp.ClientResponse:
        """The first backend's answer, whatever its status; an unreachable backend passes to the next one.

        `backends` defaults to the configured ones. The caller owns the response and must release or close it.
        """
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        failure: ProxyError | None = None
        for backend in backends or self.backends:
            request = translation(backend, await _credential_headers(backend))
            try:
                return await self._session.request(
                    request.method,
                    request.url,
                    headers=request.headers,
                    data=_payload(request.body),
                    allow_redirects=False,
                )
            except (TimeoutError, aiohttp.ServerTimeoutError):
                failure = GatewayTimeout(
                    f"Backend '{backend.name}' did not answer in time.", code="upstream_timeout"
                )
            except aiohttp.ClientError as exc:
                failure = BadGateway(
                    f"Backend '{backend.name}' could not be reached ({type(exc).__name__}).",
                    code="upstream_unreachable",
                )
            log.warning("backend %s failed: %s", backend.name, failure.message)
        assert failure is not None
        raise failure


async def _credential_headers(backend: Backend) -> Mapping[str, str] | None:
    """The backend's server-side auth headers; None means the client's own key is to be used."""
    return await backend.credential.headers() if backend.credential is not None else None


def _payload(body: bytes) -> bytes | io.BytesIO | None:
    """Large bodies go as BytesIO, which aiohttp writes in slices (it warns about big raw bytes); no copy is made."""
    if len(body) > _LARGE_BODY:
        return io.BytesIO(body)
    return body or None
