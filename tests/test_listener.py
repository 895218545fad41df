"""The listener's limits against raw-socket peers that behave badly: nothing holds a connection slot for long
without bringing a request, and what cannot be parsed is answered 400 in OpenAI's shape."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from azproxy.config import Limits
from azproxy.listener import start_server

Serve = Callable[..., Awaitable[int]]
QUICK = Limits(header_timeout=2, keepalive_timeout=2, body_timeout=0.5, body_min_rate=1_000_000)


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def slow(_request: web.Request) -> web.Response:
    await asyncio.sleep(0.8)
    return web.Response(text="slow")


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(limits: Limits = QUICK, **options: Any) -> int:
        app = web.Application()
        app.router.add_post("/echo", echo)
        app.router.add_get("/slow", slow)
        app.router.add_get("/healthz", ok)
        runner, port = await start_server(app, "127.0.0.1", 0, limits, **options)
        runners.append(runner)
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


async def until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything read until the server closes, which it must do within `within` seconds."""
    return await asyncio.wait_for(reader.read(), within)


def error_of(answer: bytes, status: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == status, answer[:80]
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_head_without_its_body_gets_408_and_is_closed(serve: Serve) -> None:
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
    assert error_of(await until_closed(reader, 3), b"408")["code"] == "body_timeout"
    writer.close()


async def test_chunked_body_with_a_long_gap_is_cut(serve: Serve) -> None:
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    assert error_of(await until_closed(reader, 3), b"408")["code"] == "body_timeout"
    writer.close()


async def test_body_arriving_in_time_is_served(serve: Serve) -> None:
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nab")
    await asyncio.sleep(0.2)
    writer.write(b"cde")
    answer = await until_closed(reader, 3)
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b"abcde")
    writer.close()


async def test_idle_timer_runs_between_requests_but_not_during_one(serve: Serve) -> None:
    port = await serve(Limits(header_timeout=0.3, keepalive_timeout=0.3))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # served longer than either timeout
    await asyncio.wait_for(reader.readuntil(b"slow"), 3)
    assert await until_closed(reader, 2) == b""  # then idle: closed by the keep-alive timer
    writer.close()


async def test_invalid_idna_target_is_answered_400(serve: Serve) -> None:
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET http://xn--a/secret-path HTTP/1.1\r\nHost: xn--a\r\n\r\n")
    answer = await until_closed(reader, 3)
    assert error_of(answer, b"400")["code"] == "malformed_request"
    assert b"secret-path" not in answer
    assert b"xn--a" not in answer
    writer.close()


async def held(port: int, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def served(port: int, address: str) -> bool:
    reader, writer = await held(port, address)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    try:
        return (await until_closed(reader, 3)).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_per_address_cap(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    port = await serve(Limits(max_connections_per_ip=10, header_timeout=5))
    first = [await held(port, "127.0.0.1") for _ in range(10)]
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.WARNING, "azproxy.listener"):
        over = [await held(port, "127.0.0.1") for _ in range(2)]
        for reader, _ in over:
            assert await until_closed(reader, 1) == b""  # closed at once
    assert sum("MAX_CONNECTIONS_PER_IP" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert await served(port, "127.0.0.2")  # another address is not affected
    for _, writer in first + over:
        writer.close()
    await asyncio.sleep(0.1)
    assert await served(port, "127.0.0.1")  # slots are given back


async def test_trusted_proxies_only_count_against_the_global_cap(serve: Serve) -> None:
    limits = Limits(max_connections_per_ip=2, header_timeout=5)
    port = await serve(limits, trusted_proxies=(ipaddress.ip_network("127.0.0.3/32"),))
    first = [await held(port, "127.0.0.3") for _ in range(4)]
    await asyncio.sleep(0.1)
    assert await served(port, "127.0.0.3")
    for _, writer in first:
        writer.close()


async def test_client_gone_while_its_answer_is_written_is_no_error(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A client whose connection closes while its answer is written (aiohttp's writer raises
    ClientConnectionResetError) left of its own accord: a debug line, never aiohttp's ERROR with a traceback."""

    async def gone(request: web.Request) -> web.Response:
        assert request.transport is not None
        request.transport.close()  # the client's connection is closing, as when it left
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    app = web.Application()
    app.router.add_get("/gone", gone)
    runner, port = await start_server(app, "127.0.0.1", 0, QUICK)
    caplog.set_level(logging.DEBUG)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
        await until_closed(reader, 3)
        writer.close()
    finally:
        await runner.cleanup()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("client left before its answer was written" in r.getMessage() for r in caplog.records)
