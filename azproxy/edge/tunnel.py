"""CONNECT tunnels: intercepted (TLS ended by azproxy, requests served by the same app) or blind (bytes piped).

aiohttp treats the rest of a CONNECT connection as upgraded: the handler answers `200 Connection established`
on the raw transport, takes the transport over in the same step (an `await` in between would let early client
bytes land in aiohttp's buffer), and returns only when the tunnel is over.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable
from typing import Any, Final, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from azproxy.edge.aiohttp_seam import forget_connection, handler_for_tunnel
from azproxy.edge.arrival import Arrival
from azproxy.errors import BadGateway

log = logging.getLogger(__name__)

ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: What a CONNECT handler returns once its tunnel is over: the connection is no longer aiohttp's, so this
#: answer is never sent.
TAKEN_OVER: Final = web.Response()
_HANDSHAKE_TIMEOUT: Final = 10.0


class Tunnels:
    """Which connection handler serves which intercepted tunnel, so the edge knows requests inside it as such."""

    def __init__(self, header_timeout: float) -> None:
        self._open: dict[RequestHandler, Arrival] = {}
        #: Like a new connection, a new tunnel must bring its first request head within this many seconds.
        self._header_timeout = header_timeout
        self._heard: set[RequestHandler] = set()

    def arrival_for(self, handler: RequestHandler) -> Arrival | None:
        """The arrival of a request on `handler`'s connection, if that is a tunnel (asked once per request,
        by the edge); a tunnel that brought a request is no longer silent."""
        if not self._open:
            return None
        arrival = self._open.get(handler)
        if arrival is not None:
            self._heard.add(handler)
        return arrival

    async def intercept(
        self, request: web.Request, inside: Arrival, context: ssl.SSLContext
    ) -> tuple[int, int]:
        """End TLS here with `context` and serve the tunnel's requests, known by `inside`, with a fresh
        handler of the same app; returns the decrypted bytes that went each way (from, to the client)."""
        transport = _raw_transport(request)
        inner = handler_for_tunnel(request)
        watcher = _ClosingWatcher(inner)
        loop = asyncio.get_running_loop()
        transport.write(ESTABLISHED)
        try:
            tls_transport = await loop.start_tls(
                transport, watcher, context, server_side=True, ssl_handshake_timeout=_HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("TLS handshake in tunnel to %s failed: %s", inside.target, exc)
            transport.close()
            forget_connection(request)
            return 0, 0
        if tls_transport is None:
            forget_connection(request)
            return 0, 0
        self._open[inner] = inside
        deadline = loop.call_later(self._header_timeout, self._close_if_silent, inner, tls_transport)
        counted = _CountingTransport(tls_transport)
        try:
            watcher.connection_made(cast(asyncio.Transport, counted))
            await watcher.closed
        finally:
            deadline.cancel()
            del self._open[inner]
            self._heard.discard(inner)
            tls_transport.close()
            forget_connection(request)
        return watcher.received, counted.sent

    def _close_if_silent(self, inner: RequestHandler, tls_transport: asyncio.BaseTransport) -> None:
        if inner not in self._heard:
            tls_transport.close()


async def blind(request: web.Request, addresses: list[tuple[str, int]]) -> tuple[int, int]:
    """Connect to the first reachable address (502 if none), then pipe bytes both ways until both sides end;
    returns the bytes that went each way (from the client, to the client)."""
    loop = asyncio.get_running_loop()
    upstream_side = _Pipe()
    upstream: asyncio.Transport | None = None
    for address, port in addresses:
        try:
            upstream, _ = await loop.create_connection(lambda: upstream_side, address, port)
            break
        except OSError as exc:
            log.debug("tunnel connect to %s:%s failed: %s", address, port, exc)
    if upstream is None:
        raise BadGateway("The tunnel target could not be reached.", code="upstream_unreachable")
    client = _raw_transport(request)
    client_side = _Pipe()
    client.pause_reading()
    client.write(ESTABLISHED)
    client.set_protocol(client_side)
    client_side.connect(client, upstream)
    upstream_side.connect(upstream, client)
    client.resume_reading()
    try:
        await asyncio.gather(client_side.closed, upstream_side.closed)
    finally:
        client.close()
        upstream.close()
        forget_connection(request)
    return client_side.received, upstream_side.received


def _raw_transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client left before the tunnel opened")
    return transport  # uvloop's transports implement asyncio.Transport without subclassing it


class _Pipe(asyncio.Protocol):
    """One side of a blind tunnel: what it reads goes to the peer, with back-pressure, and EOF is passed on."""

    def __init__(self) -> None:
        #: Bytes this side read (and passed on to its peer).
        self.received = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._own: asyncio.Transport | None = None
        self._peer: asyncio.Transport | None = None
        self._peer_pipe: _Pipe | None = None
        self.saw_eof = False

    def connect(self, own: asyncio.Transport, peer: asyncio.Transport) -> None:
        self._own, self._peer = own, peer
        peer_protocol = peer.get_protocol()
        self._peer_pipe = peer_protocol if isinstance(peer_protocol, _Pipe) else None

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._peer is not None:
            self._peer.write(data)

    def eof_received(self) -> bool:
        self.saw_eof = True
        if self._peer is None:
            return False
        if self._peer_pipe is not None and self._peer_pipe.saw_eof:
            self._peer.close()  # both directions are done
            return False
        if self._peer.can_write_eof():
            self._peer.write_eof()
            return True  # keep our side open: the other direction may still carry data
        self._peer.close()
        return False

    def pause_writing(self) -> None:
        if self._peer is not None:
            self._peer.pause_reading()

    def resume_writing(self) -> None:
        if self._peer is not None:
            self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._peer is not None and not self._peer.is_closing():
            self._peer.close()
        if not self.closed.done():
            self.closed.set_result(None)


class _ClosingWatcher(asyncio.Protocol):
    """Delegates to aiohttp's RequestHandler (which has __slots__) and tells when the connection ends.

    start_tls may hand over decrypted bytes before it returns the transport (the first request often rides with
    the client's last handshake message); they wait here until the handler has its transport.
    """

    def __init__(self, handler: RequestHandler) -> None:
        self.handler = handler
        #: Decrypted bytes from the client.
        self.received = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] | None = []
        self._early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._early is None or self.closed.done():
            return
        self.handler.connection_made(transport)
        early, self._early = self._early, None
        for data in early:
            self.handler.data_received(data)
        if self._early_eof:
            self.handler.eof_received()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self._early is not None:
            self._early.append(data)
        else:
            self.handler.data_received(data)

    def eof_received(self) -> None:
        if self._early is not None:
            self._early_eof = True
        else:
            self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._early is None:
            self.handler.connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class _CountingTransport:
    """The TLS transport as the tunnel's handler sees it: every call passes through, and what is written is
    counted (for the tunnel's access-log line)."""

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += len(data)
        cast(asyncio.WriteTransport, self._transport).write(data)

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        chunks = list(chunks)
        self.sent += sum(len(chunk) for chunk in chunks)
        cast(asyncio.WriteTransport, self._transport).writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
