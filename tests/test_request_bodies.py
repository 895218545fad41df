"""Request bodies as clients send them: compressed, announced with `Expect`, and many at once."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from azproxy.emulator import Emulator
from azproxy.state import STATE

from .conftest import AZURE_KEY, Proxy, ProxyFactory

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "ping"}]}
HEADERS = {"Authorization": f"Bearer {AZURE_KEY}", "Content-Type": "application/json"}


class RawUpstream:
    """Stands in for Azure and records each request's body bytes as they arrived, undecoded."""

    def __init__(self) -> None:
        self.received: list[tuple[str, CIMultiDictProxy[str], bytes]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.received.append((request.path, request.headers, await request.content.read()))
        return web.json_response({"id": "c1", "object": "chat.completion", "choices": []})


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_body_is_forwarded_exactly_as_sent(
    aiohttp_server: Any, make_proxy: ProxyFactory, encoding: str
) -> None:
    upstream = RawUpstream()
    app = web.Application()
    app.router.add_post("/{tail:.*}", upstream.answer)
    server = await aiohttp_server(app, auto_decompress=False)
    proxy = await make_proxy(AZURE_OPENAI_ENDPOINT=str(server.make_url("")).rstrip("/"))
    raw = json.dumps(CHAT).encode()
    sent = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions", data=sent, headers=HEADERS | {"Content-Encoding": encoding}
        ) as response,
    ):
        assert response.status == 200, await response.text()
    ((path, headers, body),) = upstream.received
    assert path == "/openai/deployments/gpt-4o/chat/completions"  # the model was read from a decoded copy
    assert body == sent
    assert headers["Content-Encoding"] == encoding
    assert headers["Content-Length"] == str(len(sent))


async def test_a_compressed_body_azproxy_must_change_goes_decoded(proxy: Proxy, emulator: Emulator) -> None:
    """A stream that did not ask for usage gets stream_options added: that body can only go decoded."""
    raw = json.dumps(CHAT | {"stream": True}).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions",
            data=gzip.compress(raw),
            headers=HEADERS | {"Content-Encoding": "gzip"},
        ) as response,
    ):
        assert response.status == 200, await response.text()
        await response.read()
    assert "Content-Encoding" not in emulator.last.headers
    assert json.loads(emulator.last.body) == CHAT | {
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_bodies_in_encodings_azproxy_cannot_read_are_415(proxy: Proxy, emulator: Emulator) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions", data=b"\x00\x01", headers=HEADERS | {"Content-Encoding": "br"}
        ) as response,
    ):
        assert response.status == 415
        assert (await response.json())["error"]["param"] == "Content-Encoding"
        garbled = await session.post(
            proxy.url / "v1/chat/completions",
            data=b"not gzip",
            headers=HEADERS | {"Content-Encoding": "gzip"},
        )
        assert garbled.status == 400
    assert emulator.received == []


async def test_compression_bomb_gets_413(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    bomb = gzip.compress(b'{"model": "gpt-4o", "x": "' + b"0" * (8 * 1024 * 1024) + b'"}')
    proxy = await make_proxy(AZPROXY_MAX_BODY="1M")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions", data=bomb, headers=HEADERS | {"Content-Encoding": "gzip"}
        ) as response,
    ):
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert emulator.received == []


async def test_bodies_past_max_buffered_get_503(make_proxy: ProxyFactory) -> None:
    """Declared or not, a body that would take the bodies being read past AZPROXY_MAX_BUFFERED is refused."""
    proxy = await make_proxy(AZPROXY_MAX_BUFFERED="4K")
    budget = proxy.server.app[STATE].bodies
    large = json.dumps(CHAT | {"filler": "x" * 8192}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(large), 1024):
            yield large[start : start + 1024]

    async with aiohttp.ClientSession() as session:
        for data in (large, chunked()):
            async with session.post(
                proxy.url / "v1/chat/completions", data=data, headers=HEADERS
            ) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "1"
                error = (await response.json())["error"]
                assert (error["type"], error["code"]) == ("server_error", "server_busy")
            assert budget.held == 0
        async with session.post(proxy.url / "v1/chat/completions", json=CHAT, headers=HEADERS) as response:
            assert response.status == 200
    assert budget.held == 0


async def test_expect_100_continue_is_answered_at_the_edge(proxy: Proxy, emulator: Emulator) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 MB and waits for the 100 before sending the body."""
    body = json.dumps(CHAT).encode()
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % (proxy.url.raw_authority.encode(), AZURE_KEY.encode(), len(body))
        )
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            status = await reader.readline()
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 200")
    assert "Expect" not in emulator.last.headers
    assert emulator.last.body == body
