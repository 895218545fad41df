"""What azproxy.edge.aiohttp_seam relies on in aiohttp, one test per use: an aiohttp upgrade that breaks one of
them fails here, by name, rather than somewhere deep in the proxy."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_protocol import RequestHandler

from azproxy.config import Limits
from azproxy.edge.aiohttp_seam import (
    HandlerFactory,
    OpenAIErrorsHandler,
    answer_started,
    await_response,
    forget_connection,
    guard_requests,
    handler_for_tunnel,
    new_response_protocol,
    request_target,
)
from azproxy.listener import start_server

Seen = dict[str, Any]
Probe = Callable[[web.Request], Awaitable[None]]


def app_with(probe: Probe) -> web.Application:
    """An app whose every request (whatever its method or target) runs `probe`, then answers 200."""

    @web.middleware
    async def every_request(request: web.Request, handler: Any) -> web.StreamResponse:
        await probe(request)
        return web.Response(text="ok")

    return web.Application(middlewares=[every_request])


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[web.AppRunner, int]]]]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, limits: Limits | None = None) -> tuple[web.AppRunner, int]:
        runner, port = await start_server(app, "127.0.0.1", 0, limits or Limits())
        runners.append(runner)
        return runner, port

    yield start
    for runner in runners:
        await runner.cleanup()


async def exchange(port: int, data: bytes, until: bytes | None = None) -> bytes:
    """Send `data` on a new connection; the answer until the server closes, or up to `until` (5 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.readuntil(until) if until else reader.read(), 5)
    finally:
        writer.close()


def assert_openai_400(answer: bytes) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", answer[:80]
    assert b"application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "malformed_request"
    assert b"\r\nServer: azproxy\r\n" in head  # no Python or aiohttp version, even here


async def test_absolute_form_target_is_seen_absolute(serve: Any) -> None:
    seen: Seen = {}

    async def probe(request: web.Request) -> None:
        seen[request.method] = request_target(request)

    _, port = await serve(app_with(probe))
    await exchange(
        port, b"GET http://api.openai.com/v1/models?x=1 HTTP/1.1\r\nHost: api.openai.com\r\n\r\n", b"ok"
    )
    await exchange(
        port, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", b"\r\n\r\n"
    )
    target = seen["GET"]
    assert target.absolute
    assert (target.scheme, target.host, target.path, target.query["x"]) == (
        "http",
        "api.openai.com",
        "/v1/models",
        "1",
    )
    assert (seen["CONNECT"].host, seen["CONNECT"].explicit_port) == ("api.openai.com", 443)


async def connect(handler: RequestHandler) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Run `handler` on one end of a socket pair; the other end, to talk to it."""
    ours, theirs = socket.socketpair()
    await asyncio.get_running_loop().connect_accepted_socket(lambda: handler, ours)
    return await asyncio.open_connection(sock=theirs)


async def answer_of(handler: RequestHandler, data: bytes) -> bytes:
    reader, writer = await connect(handler)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


MALFORMED = b"GET / HTTP/1.1\r\nHost: x\r\nX-Bad: a\nInjected: b\r\n\r\n"


async def test_tunnel_handler_is_azproxys_and_answers_in_openai_shape(serve: Any) -> None:
    made: list[RequestHandler] = []

    async def probe(request: web.Request) -> None:
        made.append(handler_for_tunnel(request))

    runner, port = await serve(app_with(probe))
    await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"ok")
    inner = made[0]
    assert isinstance(inner, OpenAIErrorsHandler)
    assert inner.tunnelled
    reader, writer = await connect(inner)
    assert inner in runner.server.connections  # a connection of the same server
    writer.write(MALFORMED)
    assert_openai_400(await asyncio.wait_for(reader.read(), 5))
    writer.close()


async def test_tunnel_handler_of_a_foreign_server_keeps_its_arguments(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """aiohttp's own test server (its web.Server, its handler arguments) still gets azproxy's handler."""
    made: list[RequestHandler] = []

    async def probe(request: web.Request) -> None:
        made.append(handler_for_tunnel(request))

    server = await aiohttp_server(app_with(probe), max_headers=5)
    await exchange(server.port or 0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"ok")
    assert isinstance(made[0], OpenAIErrorsHandler)
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10)) + b"\r\n"
    assert_openai_400(await answer_of(made[0], many))


async def test_forget_connection_removes_it_from_the_server(serve: Any) -> None:
    forgotten: list[web.Request] = []
    done = asyncio.Event()

    async def probe(request: web.Request) -> None:
        forgotten.append(request)
        forget_connection(request)
        done.set()

    runner, port = await serve(app_with(probe))
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(done.wait(), 3)
    await asyncio.sleep(0.1)  # aiohttp drops it once the request's task is over
    assert forgotten[0].protocol not in runner.server.connections
    forget_connection(forgotten[0])  # a second call (the tunnel's own clean-up) is harmless
    writer.close()


async def test_answer_started_flips_after_a_write(serve: Any) -> None:
    seen: list[bool] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        seen.append(answer_started(request))
        await response.prepare(request)
        seen.append(answer_started(request))
        await response.write(b"x")
        return response

    app = web.Application()
    app.router.add_get("/", answer)
    _, port = await serve(app)
    await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert seen == [False, True]


async def test_max_headers_is_enforced(serve: Any) -> None:
    async def probe(_request: web.Request) -> None:
        pass

    _, port = await serve(app_with(probe), Limits(max_headers=10))
    fine = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(5))
    assert (await exchange(port, fine + b"Connection: close\r\n\r\n")).startswith(b"HTTP/1.1 200")
    many = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(20)) + b"\r\n"
    assert_openai_400(await exchange(port, many))


class Recorder:
    """Connection hooks that note what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def admit(self, handler: OpenAIErrorsHandler, transport: asyncio.BaseTransport) -> bool:
        self.events.append("admit")
        return True

    def request_started(self, handler: OpenAIErrorsHandler, request: web.BaseRequest) -> None:
        self.events.append(f"start {request.path}")

    def data_received(self, handler: OpenAIErrorsHandler, size: int) -> None:
        if not self.events[-1].startswith("data"):
            self.events.append("data")

    def request_finished(self, handler: OpenAIErrorsHandler) -> None:
        self.events.append("finished")

    def connection_lost(self, handler: OpenAIErrorsHandler) -> None:
        self.events.append("lost")


async def test_hooks_see_every_step_of_a_connection() -> None:
    """The handler's overrides (connection_made, data_received, log_access, connection_lost) and the request
    factory are each called where azproxy's listener needs them, and a factory failure becomes a 400."""
    runner = web.AppRunner(app_with(lambda _request: asyncio.sleep(0)), handler_cancellation=True)
    await runner.setup()
    assert runner.server is not None
    guard_requests(runner.server)
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    listening = await loop.create_server(HandlerFactory(runner.server, recorder), "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answer = await exchange(port, two)
        assert answer.count(b"HTTP/1.1 200") == 2
        await asyncio.sleep(0.05)
        assert recorder.events == ["admit", "data", "start /a", "finished", "start /b", "finished", "lost"]
        assert_openai_400(await exchange(port, b"GET http://xn--a/ HTTP/1.1\r\nHost: x\r\n\r\n"))
    finally:
        listening.close()
        await runner.cleanup()


async def test_response_protocol_parses_an_answer_and_keeps_its_read_timeout() -> None:
    """The client protocol the pool uses: armed for one answer, it yields its head and body as aiohttp's
    connector would, says when the connection can carry another request, and times out a silent backend."""
    requests: list[bytes] = []
    finished = asyncio.Event()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(b"HTTP/1.1 201 Made\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
            requests.append(await reader.readuntil(b"\r\n\r\n"))  # and never answers the second
            await reader.read()
        finally:
            writer.close()
            finished.set()

    server = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(lambda: new_response_protocol(loop), "127.0.0.1", port)
    transport = protocol.transport
    assert transport is not None
    send = lambda: transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # noqa: E731
    message, payload = await await_response(
        protocol, send, skip_payload=False, read_timeout=5, read_bufsize=2**16
    )
    assert (message.code, message.reason, message.headers["X-A"]) == (201, "Made", "b")
    assert await payload.read() == b"ok"
    assert protocol.is_connected()
    assert not protocol.should_close
    with pytest.raises(aiohttp.ServerTimeoutError):
        await await_response(protocol, send, skip_payload=False, read_timeout=0.2, read_bufsize=2**16)
    assert len(requests) == 2
    protocol.close()
    await asyncio.wait_for(finished.wait(), 5)
    server.close()
