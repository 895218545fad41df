"""Streams: chunk by chunk, complete events at the end, and a client that leaves closes the upstream."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
from aiohttp import web

from azproxy.config import load_settings
from azproxy.emulator import Emulator
from azproxy.server import build_app

from .conftest import AZURE_KEY, Proxy, ServerFactory

STREAM = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "one two three"}]}
HEADERS = {"Authorization": f"Bearer {AZURE_KEY}"}


async def test_sdk_stream_with_usage(sdk: openai.AsyncOpenAI, emulator: Emulator) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-3.5-turbo",
        messages=[{"role": "user", "content": "one two"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices == []  # Azure's filter-only first chunk reaches the client as Azure sent it
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the Azure OpenAI emulator. You said: one two"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10
    assert emulator.last.path == "/openai/deployments/gpt-35-turbo/chat/completions"
    assert emulator.last.json()["stream_options"] == {"include_usage": True}
    assert emulator.streams_finished == 1


async def test_completions_stream_with_sdk(sdk: openai.AsyncOpenAI, emulator: Emulator) -> None:
    stream = await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="abc", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text.endswith("You said: abc")
    assert emulator.last.path == "/openai/deployments/gpt-35-turbo-instruct/completions"


async def test_first_chunk_arrives_before_upstream_sends_the_last(proxy: Proxy, emulator: Emulator) -> None:
    emulator.stream_gate = asyncio.Event()  # the emulator holds the stream after its first content chunk
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=STREAM, headers=HEADERS) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        received = b""
        while b'"content": "Hello ' not in received:
            received += await asyncio.wait_for(response.content.readany(), 5)
        assert emulator.streams_finished == 0
        assert emulator.chunks_sent == 3
        emulator.stream_gate.set()
        received += await response.content.read()
    assert received.endswith(b"data: [DONE]\n\n")
    assert emulator.streams_finished == 1


async def test_client_leaving_mid_stream_closes_upstream(proxy: Proxy, emulator: Emulator) -> None:
    emulator.stream_gate = asyncio.Event()
    session = aiohttp.ClientSession()
    response = await session.post(proxy.url / "v1/chat/completions", json=STREAM, headers=HEADERS)
    await asyncio.wait_for(response.content.readany(), 5)
    response.close()
    await session.close()
    await asyncio.wait_for(emulator.stream_aborted.wait(), 5)
    assert emulator.streams_aborted == 1
    assert emulator.streams_finished == 0


async def raw_upstream(start_server: ServerFactory, pieces: list[bytes], pause: float = 0.0) -> Proxy:
    """A hand-made upstream that sends exactly `pieces` as an SSE body, then azproxy in front of it."""

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(pause)
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", stream)
    upstream = await start_server(app)
    settings = load_settings(
        {"AZURE_OPENAI_ENDPOINT": str(upstream.make_url("")).rstrip("/"), "AZPROXY_READ_TIMEOUT": "0.5"}
    )
    return Proxy(await start_server(build_app(settings)))


async def read_stream(proxy: Proxy) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=STREAM, headers=HEADERS) as response,
    ):
        return await response.read()


async def test_stream_without_final_blank_line_is_completed(start_server: ServerFactory) -> None:
    proxy = await raw_upstream(start_server, [b'data: {"a": 1}\n\n', b"data: [DONE]"])
    assert await read_stream(proxy) == b'data: {"a": 1}\n\ndata: [DONE]\n\n'
    proxy = await raw_upstream(start_server, [b'data: {"a": 1}\n\n', b"data: [DONE]\n"])
    assert await read_stream(proxy) == b'data: {"a": 1}\n\ndata: [DONE]\n\n'


async def test_slow_but_steady_stream_is_not_cut(start_server: ServerFactory) -> None:
    pieces = [f"data: {i}\n\n".encode() for i in range(8)]  # 8 x 0.2 s, twice the 0.5 s read timeout in all
    proxy = await raw_upstream(start_server, pieces, pause=0.2)
    assert await read_stream(proxy) == b"".join(pieces)


async def test_upstream_stalling_mid_stream_ends_with_error_event(start_server: ServerFactory) -> None:
    proxy = await raw_upstream(start_server, [b"data: 1\n\ndata: 2"], pause=2)
    body = await read_stream(proxy)
    assert body.startswith(b"data: 1\n\ndata: 2\n\ndata: ")
    error = json.loads(body.split(b"data: ")[-1])["error"]
    assert error["code"] == "upstream_timeout"
    assert body.endswith(b"\n\n")


async def test_plain_body_broken_midway_closes_the_connection(start_server: ServerFactory) -> None:
    """After the status line has gone out, a backend failure cannot become a second response."""

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(b"x" * 1000)
        await asyncio.sleep(5)
        return response

    app = web.Application()
    app.router.add_post("/{tail:.*}", stall)
    upstream = await start_server(app)
    settings = load_settings(
        {"AZURE_OPENAI_ENDPOINT": str(upstream.make_url("")).rstrip("/"), "AZPROXY_READ_TIMEOUT": "0.3"}
    )
    proxy = Proxy(await start_server(build_app(settings)))
    body = json.dumps({"model": "tts", "input": "x", "voice": "alloy"}).encode()
    reader, writer = await asyncio.open_connection(proxy.url.host, proxy.url.port)
    writer.write(
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    received = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes the connection
    writer.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"HTTP/1.1") == 1
    assert not received.endswith(b"0\r\n\r\n")  # no final chunk: the client can tell the body is incomplete
