"""Keep-alive HTTP/1.1 connections to the backends: the send path every proxied request takes.

A request's body is already in memory (read and bounded at the edge), so it goes out as one write of its
head and body on a pooled connection, and the answer is parsed by aiohttp's own client protocol and C parser.
aiohttp's ClientSession would build a ClientRequest, merge its headers again, start a task to write the body
and route through its connector: about 75 µs a request on a 2-core VPS, nearly half of a naive proxy's cost
(bench/RESULTS.md). WebSocket bridges and azproxy's own small GETs keep using the ClientSession.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Final

import aiohappyeyeballs
import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .edge.aiohttp_seam import ResponseProtocol, await_response, new_response_protocol

log = logging.getLogger(__name__)

#: How long an idle connection is kept for reuse; backends close theirs later (nginx 75 s, Azure minutes).
KEEPALIVE_SECONDS: Final = 15.0
#: Idle connections kept per origin: after a burst of thousands of streams, the rest are closed.
MAX_IDLE_PER_ORIGIN: Final = 512
#: How long resolved addresses are reused, as aiohttp's connector did (ttl_dns_cache=300).
DNS_TTL_SECONDS: Final = 300.0
#: The most of an answer's body buffered ahead of the relay before reading from the backend pauses.
READ_BUFFER: Final = 2**16
#: A kept connection that fails this soon after the request went out was dropped by the backend as idle, so
#: the request is sent again on a new one; a later failure may follow work done, and is not retried.
RETRY_WINDOW_SECONDS: Final = 0.2
#: Seconds before the next address of a backend is tried alongside the first (RFC 8305, as aiohttp does).
HAPPY_EYEBALLS_DELAY: Final = 0.25

Origin = tuple[str, str, int]


@dataclass(slots=True)
class _Idle:
    protocol: ResponseProtocol
    since: float


class Answer:
    """A backend's answer at its status line: what the relay reads of aiohttp's ClientResponse, on the
    connection it arrived on. `release()` after the body was read keeps the connection for the next request;
    `close()` (or a release before the end) closes it, so the backend sees the request end."""

    __slots__ = (
        "_done",
        "_pool",
        "_protocol",
        "content",
        "content_type",
        "headers",
        "origin",
        "reason",
        "status",
    )

    def __init__(
        self, pool: Connections, origin: Origin, protocol: ResponseProtocol, status: int, reason: str,
        headers: CIMultiDictProxy[str], content: aiohttp.StreamReader,
    ) -> None:  # fmt: skip
        self._pool, self.origin, self._protocol = pool, origin, protocol
        self.status, self.reason, self.headers, self.content = status, reason, headers, content
        self._done = False
        raw = headers.get("Content-Type")
        #: The media type alone, lower-case; application/octet-stream when none is given (as aiohttp).
        self.content_type = raw.partition(";")[0].strip().lower() if raw else "application/octet-stream"

    @property
    def content_length(self) -> int | None:
        raw = self.headers.get("Content-Length")
        return int(raw) if raw is not None and raw.isdigit() else None

    def set_idle_timeout(self, seconds: float | None) -> None:
        """From now on, the longest gap between two pieces of the body."""
        self._protocol.read_timeout = seconds

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if the whole body arrived, else closes."""
        if self._done:
            return
        self._done = True
        self._pool.put_back(self.origin, self._protocol)

    def close(self) -> None:
        """Done, now: the connection is closed, whatever is left unread."""
        if self._done:
            return
        self._done = True
        self._pool.forget(self._protocol)


class Connections:
    """The pool: idle connections per (scheme, host, port), most recently used first, reused while they last.

    Connections are opened to the addresses `resolver` returns (azproxy's vetting resolver), TLS-verified
    against the system's trust store for https backends.
    """

    def __init__(self, resolver: AbstractResolver) -> None:
        self._resolver = resolver
        self._idle: dict[Origin, collections.deque[_Idle]] = {}
        #: Connections carrying an answer now: closed with the pool, whatever their answers' state.
        self._in_use: set[ResponseProtocol] = set()
        self._addresses: dict[tuple[str, int], tuple[float, list[ResolveResult]]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        connect_timeout: float | None,
        first_byte_timeout: float | None,
    ) -> Answer:
        """Send one request and wait for its answer's head. Raises aiohttp's client errors (ClientOSError,
        ServerDisconnectedError, ServerTimeoutError) and TimeoutError for a connect that took too long."""
        if self._closed:
            raise aiohttp.ClientConnectionError("the connection pool is closed")
        origin: Origin = (url.scheme, url.raw_host or "", url.port or 0)
        head = _head(method, url, headers, body)
        protocol, reused = await self._connection(origin, connect_timeout)
        sent = time.monotonic()
        try:
            message, content = await _exchange(protocol, head, body, method, first_byte_timeout)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            protocol.close()
            if not reused or time.monotonic() - sent > RETRY_WINDOW_SECONDS:
                raise
            # The backend closed (or reset) an idle connection as the request went out, before any answer:
            # the race every keep-alive client meets. The request goes once more, on a new connection.
            protocol, _ = await self._connection(origin, connect_timeout, fresh=True)
            try:
                message, content = await _exchange(protocol, head, body, method, first_byte_timeout)
            except BaseException:
                protocol.close()
                raise
        except BaseException:
            protocol.close()
            raise
        self._in_use.add(protocol)
        return Answer(self, origin, protocol, message.code, message.reason, message.headers, content)

    def put_back(self, origin: Origin, protocol: ResponseProtocol) -> None:
        """A connection whose answer is over: kept for reuse when it can carry another request. The oldest idle
        ones go first: past KEEPALIVE_SECONDS, and past MAX_IDLE_PER_ORIGIN."""
        self._in_use.discard(protocol)
        if self._closed or protocol.should_close or not protocol.is_connected():
            protocol.close()
            return
        now = time.monotonic()
        idle = self._idle.setdefault(origin, collections.deque())
        idle.append(_Idle(protocol, now))
        while len(idle) > MAX_IDLE_PER_ORIGIN or now - idle[0].since >= KEEPALIVE_SECONDS:
            idle.popleft().protocol.close()

    def forget(self, protocol: ResponseProtocol) -> None:
        """A connection closed with its answer unfinished."""
        self._in_use.discard(protocol)
        protocol.close()

    async def close(self) -> None:
        """Closes every connection: the pool is closed once no request uses it (a reload's old pool, or at
        shutdown after the drain), so one still in use belongs to an answer nobody will finish."""
        self._closed = True
        for idle in self._idle.values():
            for entry in idle:
                entry.protocol.close()
        self._idle.clear()
        for protocol in self._in_use:
            protocol.close()
        self._in_use.clear()

    async def _connection(
        self, origin: Origin, connect_timeout: float | None, *, fresh: bool = False
    ) -> tuple[ResponseProtocol, bool]:
        """An idle connection to `origin` (and True), else a new one (and False)."""
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle and not fresh:
            entry = idle.pop()
            protocol = entry.protocol
            # should_close also says the backend sent something while the connection was idle: bytes no
            # request asked for, which must never be read as the next request's answer.
            if (
                now - entry.since < KEEPALIVE_SECONDS
                and protocol.is_connected()
                and not protocol.should_close
            ):
                return protocol, True
            entry.protocol.close()
        async with asyncio.timeout(connect_timeout):
            return await self._connect(origin), False

    async def _connect(self, origin: Origin) -> ResponseProtocol:
        scheme, host, port = origin
        tls = self._tls_context() if scheme == "https" else None
        loop = asyncio.get_running_loop()
        addresses = [_addr_info(address) for address in await self._resolve(host, port)]
        try:
            # Every address in turn, the next one started HAPPY_EYEBALLS_DELAY after the last, as aiohttp's
            # connector does: an address that swallows connection attempts does not use up the whole timeout.
            sock = await aiohappyeyeballs.start_connection(
                addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, loop=loop
            )
        except OSError as exc:
            raise aiohttp.ClientOSError(
                exc.errno, f"cannot connect to {host}:{port}: {exc.strerror}"
            ) from exc
        try:
            _, protocol = await loop.create_connection(
                lambda: new_response_protocol(loop),
                sock=sock,
                ssl=tls,
                server_hostname=host.rstrip(".") if tls is not None else None,
            )
        except ssl.SSLError as exc:
            sock.close()
            raise aiohttp.ClientConnectionError(f"TLS with {host} failed: {exc.reason}") from exc
        except BaseException:
            sock.close()
            raise
        return protocol

    async def _resolve(self, host: str, port: int) -> list[ResolveResult]:
        key = (host, port)
        cached = self._addresses.get(key)
        now = time.monotonic()
        if cached is not None and now - cached[0] < DNS_TTL_SECONDS:
            return cached[1]
        try:
            addresses = await self._resolver.resolve(host, port, socket.AF_UNSPEC)
        except OSError as exc:
            raise aiohttp.ClientOSError(exc.errno, f"cannot resolve {host}: {exc}") from exc
        if not addresses:
            raise aiohttp.ClientOSError(None, f"{host} has no address")
        if len(self._addresses) >= 1024:
            self._addresses.clear()
        self._addresses[key] = (now, addresses)
        return addresses

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


def _addr_info(address: ResolveResult) -> aiohappyeyeballs.AddrInfoType:
    host, port = address["host"], address["port"]
    if address["family"] == socket.AF_INET6:
        return (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))


async def _exchange(
    protocol: ResponseProtocol, head: bytes, body: bytes, method: str, first_byte_timeout: float | None
) -> tuple[aiohttp.http.RawResponseMessage, aiohttp.StreamReader]:
    transport = protocol.transport
    if transport is None:
        raise aiohttp.ServerDisconnectedError()
    try:
        return await await_response(
            protocol,
            lambda: transport.writelines((head, body)) if body else transport.write(head),
            skip_payload=method == "HEAD",
            read_timeout=first_byte_timeout,
            read_bufsize=READ_BUFFER,
        )
    except HttpProcessingError as exc:  # not a ClientError: ClientResponse.start would have wrapped it
        raise MalformedAnswer(f"the backend's answer is not HTTP azproxy can read ({exc.message})") from None


class MalformedAnswer(aiohttp.ClientConnectionError):
    """A backend answered with a head that does not parse (bad status line, headers past aiohttp's limits): a
    failed attempt like an unreachable backend, so 502 and failover rather than an error of azproxy's."""


def _head(method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> bytes:
    """The request line and headers, with Host and Content-Length as azproxy computes them. A name or value
    with CR or LF is refused rather than written (header injection); aiohttp's writer does the same."""
    target = url.raw_path_qs
    host = url.host_subcomponent or ""
    if url.port is not None and not url.is_default_port():
        host = f"{host}:{url.port}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    text = "\r\n".join(lines)
    breaks = len(lines) - 1
    if text.count("\r") != breaks or text.count("\n") != breaks:
        raise ValueError("a header holds a line break")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
