"""The listening socket, with azproxy's limits on what a connection may hold without ever bringing a key.

Caps: open connections overall and per client address (trusted proxies count only overall). Deadlines: the
first request head of a new connection, every request body (a base time plus its length at a minimum rate),
and idle time between requests. A request aiohttp cannot build is answered 400, in OpenAI's shape, and closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import ssl
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from .config import Limits
from .edge.aiohttp_seam import HandlerFactory, OpenAIErrorsHandler, answer_started, guard_requests
from .errors import error_body

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Connections the kernel queues before azproxy accepts them: thousands of clients may connect at once (a burst
#: after a restart, a benchmark). Linux caps it at net.core.somaxconn (4096 by default since 5.4).
LISTEN_BACKLOG: Final = 4096
#: Set once this process stops accepting connections to drain (SIGTERM, SIGINT): a readiness check reads it.
DRAINING: Final = asyncio.Event()
#: Seconds between two log lines about one address over its connection cap.
_REFUSAL_LOG_INTERVAL: Final = 60.0
_BODY_TIMEOUT_ANSWER: Final = error_body(
    "The request body did not arrive in time.", "invalid_request_error", code="body_timeout"
)


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    limits: Limits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    trusted_proxies: Collection[IPNetwork] = (),
    reuse_port: bool = False,
    backlog: int = LISTEN_BACKLOG,
    shutdown_timeout: float = 60.0,
) -> tuple[web.AppRunner, int]:
    """Serve `app` inside the running loop; returns the runner and the bound port. Cleaning the runner up stops
    accepting at once, lets requests under way finish for up to `shutdown_timeout` seconds, then closes the rest.

    `reuse_port` lets several processes listen on the one port (SO_REUSEPORT), the kernel sharing connections.
    """
    handler_args: dict[str, Any] = {
        "access_log": None,  # azproxy writes its own, one line per request (observe.py)
        # Request bodies stay as the client encoded them: forwarded exactly, read from a bounded decoded copy.
        "auto_decompress": False,
        "keepalive_timeout": limits.keepalive_timeout,
        "max_line_size": limits.max_header_size,
        "max_field_size": limits.max_header_size,
        "max_headers": limits.max_headers,
    }
    runner = _Runner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, **handler_args)
    await runner.setup()
    server = runner.server
    assert server is not None
    guard_requests(server)
    factory = HandlerFactory(server, _Guard(limits, trusted_proxies), **handler_args)

    def accept() -> asyncio.Protocol:
        if len(server.connections) >= limits.max_connections:
            log.warning("refusing a connection: %d open (AZPROXY_MAX_CONNECTIONS)", limits.max_connections)
            return _Refused()
        return factory()

    loop = asyncio.get_running_loop()
    try:
        runner.listening = await loop.create_server(
            accept, host, port, ssl=ssl_context, backlog=backlog, reuse_address=True, reuse_port=reuse_port
        )
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.listening.sockets[0].getsockname()[1])


class _Runner(web.AppRunner):
    """The app's start-up and clean-up, with the listening socket closed first when it stops."""

    __slots__ = ("listening",)

    listening: asyncio.AbstractServer | None

    async def setup(self) -> None:
        self.listening = None
        await super().setup()

    async def cleanup(self) -> None:
        if self.listening is not None:
            self.listening.close()
        await super().cleanup()
        if self.listening is not None:
            await self.listening.wait_closed()
            self.listening = None


@dataclass(slots=True)
class _Connection:
    """What the guard knows of one connection."""

    address: str | None
    busy: bool = False
    timer: asyncio.TimerHandle | None = None
    body: _Body | None = None


@dataclass(slots=True)
class _Body:
    """A request body still on its way: its deadline, or (chunked) its gaps and its average rate."""

    request: web.BaseRequest
    started: float
    length: int | None
    last_data: float
    received: int = 0
    deadline: float = field(default=math.inf)


class _Guard:
    """azproxy's connection policy, told by each handler what happens on its connection."""

    def __init__(self, limits: Limits, trusted_proxies: Collection[IPNetwork]) -> None:
        self._limits = limits
        self._trusted = tuple(trusted_proxies)
        self._loop = asyncio.get_running_loop()
        self._open: dict[OpenAIErrorsHandler, _Connection] = {}
        self._per_address: dict[str, int] = {}
        self._refusal_logged: dict[str, float] = {}

    def admit(self, handler: OpenAIErrorsHandler, transport: asyncio.BaseTransport) -> bool:
        address = None if handler.tunnelled else _address(transport)
        if address is not None and self._is_trusted(address):
            address = None  # a proxy in front of azproxy carries many clients: only the global cap applies
        if address is not None:
            count = self._per_address.get(address, 0)
            if count >= self._limits.max_connections_per_ip:
                self._log_refusal(address)
                return False
            self._per_address[address] = count + 1
        connection = self._open[handler] = _Connection(address)
        self._idle(handler, connection, self._limits.header_timeout)
        return True

    def request_started(self, handler: OpenAIErrorsHandler, request: web.BaseRequest) -> None:
        connection = self._open.get(handler)
        if connection is None:
            return
        connection.busy = True
        _cancel(connection)
        if request.method == "CONNECT":
            return  # the rest of the connection is a tunnel, not a body
        length = request.content_length
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        if (length or 0) <= 0 and not chunked:
            return
        now = self._loop.time()
        body = connection.body = _Body(request, now, None if chunked else length, now)
        if body.length is not None:
            body.deadline = now + self._limits.body_timeout + body.length / self._limits.body_min_rate
        self._watch_body(handler, connection)

    def data_received(self, handler: OpenAIErrorsHandler, size: int) -> None:
        connection = self._open.get(handler)
        if connection is not None and connection.body is not None:
            connection.body.received += size
            connection.body.last_data = self._loop.time()

    def request_finished(self, handler: OpenAIErrorsHandler) -> None:
        connection = self._open.get(handler)
        if connection is None:
            return
        connection.busy = False
        connection.body = None
        _cancel(connection)
        self._idle(handler, connection, self._limits.keepalive_timeout)

    def connection_lost(self, handler: OpenAIErrorsHandler) -> None:
        connection = self._open.pop(handler, None)
        if connection is None:
            return
        _cancel(connection)
        if connection.address is not None:
            left = self._per_address[connection.address] - 1
            if left:
                self._per_address[connection.address] = left
            else:
                del self._per_address[connection.address]

    def _idle(self, handler: OpenAIErrorsHandler, connection: _Connection, timeout: float) -> None:
        """Close the connection unless a request starts within `timeout` seconds."""
        connection.timer = self._loop.call_later(timeout, self._close_if_idle, handler, connection)

    def _close_if_idle(self, handler: OpenAIErrorsHandler, connection: _Connection) -> None:
        connection.timer = None
        if not connection.busy:
            log.debug("closing a connection idle for too long")
            handler.force_close()

    def _watch_body(self, handler: OpenAIErrorsHandler, connection: _Connection) -> None:
        body = connection.body
        if body is None or body.request.content.is_eof():
            connection.body = None
            return
        now = self._loop.time()
        due = body.deadline
        if body.length is None:  # chunked: no gap longer than body_timeout, the minimum rate on average
            limits = self._limits
            due = min(
                body.last_data + limits.body_timeout,
                body.started + limits.body_timeout + body.received / limits.body_min_rate,
            )
        if now < due:
            connection.timer = self._loop.call_at(due, self._watch_body, handler, connection)
            return
        connection.timer = None
        log.info("closing a connection whose request body did not arrive in time")
        transport = handler.transport
        if transport is not None and not answer_started(body.request):
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(_BODY_TIMEOUT_ANSWER), _BODY_TIMEOUT_ANSWER)
            )
        handler.force_close()

    def _log_refusal(self, address: str) -> None:
        now = self._loop.time()
        if now - self._refusal_logged.get(address, -math.inf) < _REFUSAL_LOG_INTERVAL:
            return
        for stale in [a for a, t in self._refusal_logged.items() if now - t >= _REFUSAL_LOG_INTERVAL]:
            del self._refusal_logged[stale]
        self._refusal_logged[address] = now
        log.warning(
            "refusing connections from %s: %d open (AZPROXY_MAX_CONNECTIONS_PER_IP)",
            address,
            self._limits.max_connections_per_ip,
        )

    def _is_trusted(self, address: str) -> bool:
        if not self._trusted:
            return False
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self._trusted)


def _address(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def _cancel(connection: _Connection) -> None:
    if connection.timer is not None:
        connection.timer.cancel()
        connection.timer = None


class _Refused(asyncio.Protocol):
    """Over the connection cap: closed at once, before aiohttp spends anything on it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
