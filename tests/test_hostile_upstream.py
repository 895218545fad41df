"""A backend that answers with more than any real answer holds: azproxy relays it without holding it whole."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import aiohttp
import pytest
from aiohttp import web

from azproxy import shape
from azproxy.config import load_settings
from azproxy.rewrite import Rewrite
from azproxy.server import build_app

from .conftest import AZURE_KEY, Proxy, ServerFactory

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
STREAM = CHAT | {"stream": True}
HEADERS = {"Authorization": f"Bearer {AZURE_KEY}"}
HUGE = 64 * 1024 * 1024
PIECE = 1024 * 1024


async def proxy_for(start_server: ServerFactory, answer: web.Handler, **environment: str) -> Proxy:
    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    upstream = await start_server(app)
    source = {"AZURE_OPENAI_ENDPOINT": str(upstream.make_url("")).rstrip("/")} | environment
    return Proxy(await start_server(build_app(load_settings(source))))


async def test_huge_error_body_is_streamed_unchanged(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """64 MB of error JSON without a length: past MAX_WHOLE the relay streams the rest instead of reading on."""
    head, filler = b'{"error": {"code": "x", "message": "', b"a" * PIECE
    tail = b'"}}'

    async def error(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(head)
        for _ in range(HUGE // PIECE):
            await response.write(filler)
        await response.write(tail)
        return response

    rewritten: list[int] = []
    original = Rewrite.error
    monkeypatch.setattr(
        Rewrite, "error", lambda self, s, body: rewritten.append(len(body)) or original(self, s, body)
    )
    proxy = await proxy_for(start_server, error)
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=CHAT, headers=HEADERS) as response,
    ):
        assert response.status == 500
        received = 0
        async with asyncio.timeout(20):
            async for chunk in response.content.iter_any():
                received += len(chunk)
    assert received == len(head) + HUGE + len(tail)
    assert rewritten == []  # never read whole
    assert any("relayed unchanged as it arrives" in r.getMessage() for r in caplog.records)


async def test_error_body_under_the_bound_is_still_reshaped(start_server: ServerFactory) -> None:
    async def error(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "x", "message": "m"}}, status=400)

    proxy = await proxy_for(start_server, error)
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=CHAT, headers=HEADERS) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_huge_event_without_its_end_passes_through_a_bounded_reshaper(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With AZPROXY_RESPONSE_SHAPE=openai, a 64 MB event that never ends is relayed as it arrives, completed."""
    first = b'data: {"model":"gpt-35-turbo","choices":[{"delta":{}}]}\n\n'
    filler = b"b" * PIECE

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first + b'data: {"model":"')
        for _ in range(HUGE // PIECE):
            await response.write(filler)
        return response

    largest = 0
    feed = shape.EventReshaper.feed

    def measured(self: shape.EventReshaper, chunk: bytes) -> bytes:
        nonlocal largest
        out = feed(self, chunk)
        largest = max(largest, len(self._pending))
        return out

    monkeypatch.setattr(shape.EventReshaper, "feed", measured)
    proxy = await proxy_for(start_server, stream, AZPROXY_RESPONSE_SHAPE="openai")
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=STREAM, headers=HEADERS) as response,
    ):
        body = bytearray()
        async with asyncio.timeout(20):
            async for chunk in response.content.iter_any():
                body += chunk
    assert body.startswith(b'data: {"model":"gpt-4o"')  # events of a normal size are still reshaped
    assert len(body) == len(first) - len("gpt-35-turbo") + len("gpt-4o") + 16 + HUGE + 2
    assert body.endswith(b"b\n\n")
    assert 0 < largest <= shape.EventReshaper.MAX_PENDING < HUGE // 16
    assert any("stream event is larger than" in r.getMessage() for r in caplog.records)


async def test_clients_leaving_mid_stream_log_no_error(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client's leaving is its own business: never an ERROR record. 50 clients leave at random points of
    their streams, the way aiohttp reports the race it leaves open: the client's connection is already
    closing when the next event is written, before the handler has been told (the write raises)."""
    events = 12
    write = web.StreamResponse.write  # the backend's own writes stay unpatched

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):  # azproxy closes it when its client leaves
            for index in range(events):
                await write(response, b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % index)
        return response

    rng = random.Random(7)
    leaving_at: dict[int, int] = {}

    async def write_or_find_client_gone(self: web.StreamResponse, data: bytes) -> None:
        left = leaving_at.setdefault(id(self), rng.randrange(events + 1))
        leaving_at[id(self)] = left - 1
        if left == 0:
            raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")
        await write(self, data)

    proxy = await proxy_for(start_server, stream)
    monkeypatch.setattr(web.StreamResponse, "write", write_or_find_client_gone)
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session, asyncio.timeout(20):
        for _ in range(50):
            async with session.post(
                proxy.url / "v1/chat/completions", json=STREAM, headers=HEADERS
            ) as response:
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await response.read()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any("client left" in r.getMessage() for r in caplog.records)
