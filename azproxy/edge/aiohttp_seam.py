"""Where azproxy reaches past aiohttp's documented API, all in one place, so an aiohttp upgrade breaks one module.

Each remaining private use says why no public alternative serves and which aiohttp releases it was checked
on; tests/test_aiohttp_seam.py fails loudly when an upgrade changes one of them. CI runs it on the floor of the
declared range (3.13.4) and on the newest release; it also passed on 3.12.15 and 3.13.0, where aiohttp itself
does not yet enforce max_headers.

Every connection of azproxy's listener is served by `OpenAIErrorsHandler`, constructed by a `HandlerFactory`
for the AppRunner's public `server` (aiohttp has no hook for the handler class; the factory is the
`protocol_factory` given to `loop.create_server`). The handler answers requests too malformed to route in
OpenAI's JSON shape: aiohttp's own text/plain answer quotes the offending bytes, which may hold a key.

On the client side, azproxy's connection pool (connections.py) speaks through aiohttp's own response protocol
(`ResponseHandler`, with its C parser, read timeouts and flow control) without a ClientSession around it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import yarl
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawRequestMessage, RawResponseMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from azproxy.errors import error_response

log = logging.getLogger(__name__)

RequestFactory = Callable[..., web.BaseRequest]
RequestHandlerFunction = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class ConnectionHooks(Protocol):
    """What the listener's policy (caps and deadlines) learns about each connection of its factory."""

    def admit(self, handler: OpenAIErrorsHandler, transport: asyncio.BaseTransport) -> bool:
        """Whether to serve a new connection; False closes it before aiohttp registers it."""

    def request_started(self, handler: OpenAIErrorsHandler, request: web.BaseRequest) -> None:
        """A request head is complete and the request is about to be served."""

    def data_received(self, handler: OpenAIErrorsHandler, size: int) -> None:
        """`size` bytes arrived on the connection (head, body or pipelined requests)."""

    def request_finished(self, handler: OpenAIErrorsHandler) -> None:
        """The answer to the current request has been written (or the client left while it was)."""

    def connection_lost(self, handler: OpenAIErrorsHandler) -> None:
        """The connection is over, or a tunnel took its transport over."""


class HandlerFactory:
    """Makes azproxy's handlers for one aiohttp `web.Server`: a `protocol_factory` for `loop.create_server`.

    web.Server.__call__ would make aiohttp's own RequestHandler; this builds azproxy's class, with the keyword
    arguments RequestHandler documents (the same ones web.Server would pass).
    """

    def __init__(self, server: web.Server, hooks: ConnectionHooks | None, **handler_args: Any) -> None:
        self.server = server
        self.hooks = hooks
        self.loop = asyncio.get_running_loop()
        self.handler_args = handler_args

    def __call__(self) -> OpenAIErrorsHandler:
        return OpenAIErrorsHandler(self, tunnelled=False)

    def for_tunnel(self) -> OpenAIErrorsHandler:
        """A handler for the inner connection of an intercepted tunnel (the same client, already counted)."""
        return OpenAIErrorsHandler(self, tunnelled=True)


class OpenAIErrorsHandler(RequestHandler):
    """aiohttp's per-connection protocol, with OpenAI-shaped refusals and the listener's hooks."""

    __slots__ = ("_admitted", "_factory", "_refusal", "tunnelled")

    def __init__(self, factory: HandlerFactory, *, tunnelled: bool) -> None:
        # RequestHandler(manager, loop=..., **kwargs) is how web.Server.__call__ builds it (3.12.15 to 3.14.5).
        super().__init__(factory.server, loop=factory.loop, **factory.handler_args)
        self._factory = factory
        self.tunnelled = tunnelled
        self._admitted = False
        #: Why the request being built could not be (set by the request factory, answered by the handler).
        self._refusal: str | None = None

    @property
    def factory(self) -> HandlerFactory:
        return self._factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        hooks = self._factory.hooks
        if hooks is not None and not hooks.admit(self, transport):
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._factory.hooks is not None:
            self._factory.hooks.data_received(self, len(data))

    def log_access(self, request: web.BaseRequest, response: web.StreamResponse, time: float | None) -> None:
        # aiohttp calls log_access once per request, after the answer is written (3.12.15 to 3.14.5): the one
        # overridable method that marks the end of serving a request.
        super().log_access(request, response, time)
        if self._factory.hooks is not None:
            self._factory.hooks.request_finished(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return  # refused, or already forgotten: aiohttp never saw it (again)
        self._admitted = False
        super().connection_lost(exc)
        if self._factory.hooks is not None:
            self._factory.hooks.connection_lost(self)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        transport = request.transport
        if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
            # The client left while its answer was being written: its own business, never an ERROR line.
            log.debug("client left before its answer was written: %s", type(exc).__name__)
            self.force_close()
            return web.Response(status=status)
        if status >= 500 or answer_started(request):
            return super().handle_error(request, status, exc, message)
        return malformed_request(type(exc).__name__ if exc is not None else "error")


def malformed_request(kind: str) -> web.Response:
    """The 400 for a request that cannot be built or routed: names the kind of error, never echoes bytes."""
    log.debug("malformed request refused: %s", kind)
    response = error_response(
        400,
        f"The request is not well-formed HTTP/1.1 ({kind}).",
        "invalid_request_error",
        code="malformed_request",
    )
    response.headers["Server"] = "azproxy"  # the app's response hooks never see an unrouted request
    response.force_close()
    return response


def guard_requests(server: web.Server) -> None:
    """Make `server` answer a request its request factory cannot build with a 400 instead of dying silently.

    aiohttp builds the request outside any error handling (3.12.15 to 3.14.5): when the factory raises (an
    absolute-form target whose host is not valid IDNA does), the connection's task ends and the socket stays
    open with nothing answered. `request_factory` and `request_handler` are the attributes web.Server's
    constructor sets from its arguments; every RequestHandler copies them when it is made, so this must run
    before the first connection. Checked on 3.12.15 to 3.14.5.
    """
    factory: RequestFactory = server.request_factory
    handler: RequestHandlerFunction = server.request_handler

    def make_request(message: RawRequestMessage, payload: Any, protocol: RequestHandler, *rest: Any) -> Any:
        try:
            request = factory(message, payload, protocol, *rest)
        except Exception as exc:  # whatever the factory chokes on, the client gets a 400, never silence
            if not isinstance(protocol, OpenAIErrorsHandler):
                raise
            protocol._refusal = type(exc).__name__
            request = factory(_bare(message), payload, protocol, *rest)
        if isinstance(protocol, OpenAIErrorsHandler) and protocol.factory.hooks is not None:
            protocol.factory.hooks.request_started(protocol, request)
        return request

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, OpenAIErrorsHandler) and protocol._refusal is not None:
            kind, protocol._refusal = protocol._refusal, None
            return malformed_request(kind)
        return await handler(request)

    server.request_factory = make_request
    server.request_handler = handle


def _bare(message: RawRequestMessage) -> RawRequestMessage:
    """`message` without anything that could fail to parse, so a request to refuse can still be built."""
    return message._replace(
        path="/",
        url=yarl.URL("/"),
        headers=CIMultiDictProxy(CIMultiDict()),
        raw_headers=(),
        should_close=True,
    )


def request_target(request: web.BaseRequest) -> yarl.URL:
    """The request-target as the parser read it: absolute-form for HTTP_PROXY, authority-form for CONNECT.

    Private: `request.url` is rebuilt from Host and `rel_url` drops the authority; `raw_path` holds the target
    text up to 3.14 but not in aiohttp's master, and `request.message` is deprecated. The parsed message's
    `url` is what the parser read, in every release and in master. Checked on 3.12.15 to 3.14.5.
    """
    url: yarl.URL = request._message.url
    return url


def handler_for_tunnel(request: web.BaseRequest) -> RequestHandler:
    """A new handler of the server that serves `request`, for the inner connection of an intercepted tunnel."""
    protocol = request.protocol
    if isinstance(protocol, OpenAIErrorsHandler):
        return protocol.factory.for_tunnel()
    # Served by a server azproxy's listener did not build (aiohttp's test server): no public API hands out
    # the web.Server behind a connection, nor the handler arguments it was given. Checked on 3.12.15 to 3.14.5.
    server = protocol._manager
    if server is None:
        raise ConnectionResetError("the connection closed before the tunnel opened")
    return handler_for_server(server)


def handler_for_server(server: web.Server) -> OpenAIErrorsHandler:
    """A handler of azproxy's class for a web.Server made elsewhere, with the arguments it was given.

    Private: web.Server keeps its handler arguments in `_kwargs` (3.12.15 to 3.14.5) and offers no accessor.
    """
    return HandlerFactory(server, None, **server._kwargs)()


def forget_connection(request: web.BaseRequest) -> None:
    """Tell aiohttp the connection of `request` is gone once a tunnel has taken its transport over.

    aiohttp has no API to hand a transport over; calling the protocol's connection_lost, as asyncio would
    have had the transport closed, is what removes it from web.Server.connections and stops its timers
    (3.12.15 to 3.14.5). Calling it again is harmless.
    """
    request.protocol.connection_lost(None)


def answer_started(request: web.BaseRequest) -> bool:
    """Whether any byte of an answer to `request` has been written (then no other answer can replace it).

    `output_size` is declared on the documented AbstractStreamWriter (3.12.15 to 3.14.5).
    """
    return request.writer.output_size > 0


_Value = TypeVar("_Value")


def request_key(name: str, kind: type[_Value]) -> web.RequestKey[_Value]:
    """A typed key for values stored on a request. aiohttp 3.14 added `web.RequestKey` and warns about plain
    string keys; 3.13 knows only strings, which behave the same there."""
    if hasattr(web, "RequestKey"):
        return web.RequestKey(name, kind)
    return name  # type: ignore[return-value]


#: A connection to a backend: aiohttp's client protocol, which parses answers into a head and a StreamReader.
ResponseProtocol = ResponseHandler


def new_response_protocol(loop: asyncio.AbstractEventLoop) -> ResponseProtocol:
    """The protocol for a new upstream connection (`loop.create_connection`'s factory).

    Private: aiohttp.client_proto is not documented API; ResponseHandler(loop) is how its connector makes one
    (3.13.4 to 3.14.5). Its `should_close`, `is_connected()`, `close()` and `read_timeout` are what the
    connector itself uses to pool it.
    """
    return ResponseHandler(loop)


async def await_response(
    protocol: ResponseProtocol,
    send: Callable[[], None],
    *,
    skip_payload: bool,
    read_timeout: float | None,
    read_bufsize: int,
) -> tuple[RawResponseMessage, StreamReader]:
    """Arm `protocol` for one answer, `send` the request, and wait for the answer's head.

    Private: the same three calls aiohttp's ClientSession makes on a pooled connection (set_response_params,
    start_timeout once the request is written, then read until a final answer), checked on 3.13.4 to 3.14.5.
    The body is read until the connection closes when the answer has neither a length nor chunks
    (read_until_eof), and never decoded.
    """
    protocol.set_response_params(
        skip_payload=skip_payload,
        read_until_eof=True,
        auto_decompress=False,
        read_timeout=read_timeout,
        read_bufsize=read_bufsize,
    )
    send()
    protocol.start_timeout()
    while True:
        message, payload = await protocol.read()
        # Informational answers (100 Continue, 103 Early Hints) precede the real one, as aiohttp's
        # ClientResponse.start skips them; left queued, one would answer the connection's next request.
        if not 100 <= message.code < 200 or message.code == 101:
            return message, payload
