"""The listening socket, with azproxy's limits on what connections may hold: a cap on open connections, and a
deadline for a new connection's first request head (slow-loris clients are closed, others are served)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import Limits
from .edge.protocol import new_handler

log = logging.getLogger(__name__)


async def start_server(
    app: web.Application,
    host: str,
    port: int,
    limits: Limits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    access_log: logging.Logger | None = None,
) -> tuple[web.AppRunner, int]:
    """Serve `app` inside the running loop; returns the runner (clean it up to stop) and the bound port."""
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=access_log,
        keepalive_timeout=limits.keepalive_timeout,
        max_line_size=limits.max_header_size,
        max_field_size=limits.max_header_size,
        max_headers=limits.max_headers,
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, limits, ssl_context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, site.port


class GuardedSite(web.BaseSite):
    __slots__ = ("_host", "_limits", "_port", "_silent")

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, limits: Limits, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        self._host, self._port, self._limits = host, port, limits
        #: Connections that have not yet sent a complete request head.
        self._silent: set[RequestHandler] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        sockets = getattr(self._server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else self._port

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert isinstance(server, web.Server)
        server.request_factory = self._noting_heads(server.request_factory)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._new_connection(server, loop),
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=True,
        )

    def _new_connection(self, server: web.Server, loop: asyncio.AbstractEventLoop) -> asyncio.Protocol:
        if len(server.connections) >= self._limits.max_connections:
            log.warning(
                "refusing a connection: %d open (AZPROXY_MAX_CONNECTIONS)", self._limits.max_connections
            )
            return _Refused()
        handler = new_handler(server)
        self._silent.add(handler)
        loop.call_later(self._limits.header_timeout, self._close_if_silent, handler)
        return handler

    def _close_if_silent(self, handler: RequestHandler) -> None:
        if handler in self._silent:
            self._silent.discard(handler)
            if handler.transport is not None:
                handler.force_close()

    def _noting_heads(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        silent = self._silent

        def make_request(message: Any, payload: Any, protocol: RequestHandler, *args: Any) -> Any:
            silent.discard(protocol)
            return factory(message, payload, protocol, *args)

        return make_request


class _Refused(asyncio.Protocol):
    """Over the connection cap: closed at once, before aiohttp spends anything on it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()
