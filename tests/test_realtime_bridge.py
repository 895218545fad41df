"""The realtime WebSocket bridge between a client and a recording fake upstream (and the emulator)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDictProxy
from yarl import URL

from azproxy.emulator import Emulator
from azproxy.realtime import bridge, response_create_frames

from .conftest import AZURE_KEY

PATH = "/v1/realtime"
PROMPTLY = 2.0
#: What any aiohttp WebSocket client sends on its own; everything else upstream must come from the caller.
PLUMBING = frozenset(
    {"host", "upgrade", "connection", "sec-websocket-version", "sec-websocket-key"}
    | {"accept", "accept-encoding", "user-agent"}
)
HTTP = web.AppKey("http", aiohttp.ClientSession)
FINISHED = web.AppKey("finished", asyncio.Event)

BridgeFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@dataclass
class Upstream:
    """A realtime backend that greets, echoes and records; text `close N` makes it close with code N."""

    refuse: int | None = None
    headers: list[CIMultiDictProxy[str]] = field(default_factory=list)
    frames: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.headers.append(request.headers)
        if self.refuse is not None:
            error = {"error": {"code": str(self.refuse), "message": "refused"}}
            return web.json_response(error, status=self.refuse, headers={"retry-after": "7"})
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_str("hello")
        await socket.send_bytes(b"\x00hello")
        async for message in socket:
            self.frames.append(message.data)
            if message.data == "vanish":
                assert request.transport is not None
                request.transport.abort()
            elif isinstance(message.data, str) and message.data.startswith("close "):
                await socket.close(code=int(message.data.split()[1]))
            elif message.type is WSMsgType.TEXT:
                await socket.send_str(message.data)
            else:
                await socket.send_bytes(message.data)
        self.close_code = socket.close_code
        self.closed.set()
        return socket


@pytest.fixture
async def upstream(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[Upstream, URL]:
    fake = Upstream()
    app = web.Application()
    app.router.add_get("/openai/realtime", fake.handle)
    server = await aiohttp_server(app)
    return fake, server.make_url("/openai/realtime").with_query(deployment="d")


@pytest.fixture
def make_bridge(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
) -> BridgeFactory:
    """A tiny app whose realtime route is the bridge to `url`, sending exactly `headers` upstream."""

    async def make(
        url: URL, headers: Mapping[str, str] | None = None
    ) -> TestClient[web.Request, web.Application]:
        async def http_client(app: web.Application) -> AsyncIterator[None]:
            async with aiohttp.ClientSession() as http:
                app[HTTP] = http
                yield

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                return await bridge(request, request.app[HTTP], url, headers or {"api-key": "k"})
            finally:
                request.app[FINISHED].set()

        app = web.Application()
        app[FINISHED] = asyncio.Event()
        app.cleanup_ctx.append(http_client)
        app.router.add_get(PATH, handle)
        return await aiohttp_client(app)

    return make


def upgrade_headers() -> dict[str, str]:
    key = base64.b64encode(os.urandom(16)).decode()
    return {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": key,
    }


async def bridge_finished(client: TestClient[web.Request, web.Application]) -> None:
    """The bridge handler returned promptly, and with it every frame pump it started (awaited, not just cancelled)."""
    assert client.app is not None
    async with asyncio.timeout(PROMPTLY):
        await client.app[FINISHED].wait()
    assert not [
        task for task in asyncio.all_tasks() if getattr(task.get_coro(), "__qualname__", "") == "_pump"
    ]


async def test_frames_cross_both_ways_in_order(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    sent: list[str | bytes] = [f"text {n}" if n % 2 else f"binary {n}".encode() for n in range(200)]
    async with client.ws_connect(PATH, headers={"Authorization": "Bearer client-key"}) as socket:
        for frame in sent:
            await (socket.send_str(frame) if isinstance(frame, str) else socket.send_bytes(frame))
        received = [(await socket.receive()).data for _ in range(len(sent) + 2)]
    assert received == ["hello", b"\x00hello", *sent]
    assert fake.frames == sent
    assert {
        name.lower(): value for name, value in fake.headers[0].items() if name.lower() not in PLUMBING
    } == {"api-key": "k"}
    await bridge_finished(client)


@pytest.mark.parametrize("status", [401, 404, 429, 503])
async def test_a_refused_upgrade_is_an_openai_error(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory, status: int
) -> None:
    fake, url = upstream
    fake.refuse = status
    client = await make_bridge(url)
    async with client.get(PATH, headers=upgrade_headers()) as response:
        assert response.status == status
        body = await response.json()
        assert response.headers["retry-after"] == "7"
    assert body["error"].keys() == {"message", "type", "param", "code"}
    assert body["error"]["type"] == ("invalid_request_error" if status < 500 else "upstream_error")


async def test_an_unreachable_upstream_is_502(make_bridge: BridgeFactory, closed_port: int) -> None:
    client = await make_bridge(URL(f"http://127.0.0.1:{closed_port}/openai/realtime"))
    async with client.get(PATH, headers=upgrade_headers()) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unreachable"


async def test_a_plain_get_is_refused_before_upstream_is_dialled(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    async with client.get(PATH) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "websocket_required"
    assert fake.headers == []


async def test_the_client_closing_closes_upstream_with_its_code(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    async with client.ws_connect(PATH) as socket:
        await socket.send_str("last words")
        await socket.close(code=4001)
    async with asyncio.timeout(PROMPTLY):
        await fake.closed.wait()
    assert fake.frames == ["last words"]
    assert fake.close_code == 4001
    await bridge_finished(client)


async def test_a_client_that_vanishes_closes_upstream(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    lines = [
        f"GET {PATH} HTTP/1.1",
        f"Host: {client.host}",
        *(f"{k}: {v}" for k, v in upgrade_headers().items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 101")
    writer.close()
    await writer.wait_closed()
    async with asyncio.timeout(PROMPTLY):
        await fake.closed.wait()
    assert fake.close_code == aiohttp.WSCloseCode.GOING_AWAY
    await bridge_finished(client)


@pytest.mark.parametrize("code", [1000, 4000])
async def test_upstream_closing_closes_the_client_with_its_code(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory, code: int
) -> None:
    _, url = upstream
    client = await make_bridge(url)
    async with client.ws_connect(PATH) as socket:
        await socket.send_str(f"close {code}")
        messages = [await socket.receive() for _ in range(3)]
    assert [m.type for m in messages] == [WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CLOSE]
    assert socket.close_code == code
    await bridge_finished(client)


async def test_upstream_vanishing_closes_the_client_as_bad_gateway(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    _, url = upstream
    client = await make_bridge(url)
    async with client.ws_connect(PATH) as socket:
        await socket.send_str("vanish")
        async with asyncio.timeout(PROMPTLY):
            while not socket.closed:
                await socket.receive()
    assert socket.close_code == aiohttp.WSCloseCode.BAD_GATEWAY
    await bridge_finished(client)


async def test_realtime_is_selected_and_the_key_stays_home(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    offers = ("openai-beta.realtime-v1", "openai-insecure-api-key.x", "realtime")
    async with client.ws_connect(PATH, protocols=offers) as socket:
        assert socket.protocol == "realtime"
        assert (await socket.receive()).data == "hello"
    assert "openai-insecure-api-key.x" not in json.dumps(list(fake.headers[0].items()))


async def test_an_offer_of_keys_alone_is_refused_unlogged(
    upstream: tuple[Upstream, URL], make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = upstream
    client = await make_bridge(url)
    headers = upgrade_headers() | {"Sec-WebSocket-Protocol": "openai-insecure-api-key.x"}
    async with client.get(PATH, headers=headers) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_subprotocol"
    assert fake.headers == []
    assert "openai-insecure-api-key.x" not in caplog.text


async def test_a_round_trip_through_the_emulator(
    emulator: Emulator, emulator_server: TestServer, make_bridge: BridgeFactory
) -> None:
    query = {"api-version": "2025-04-01-preview", "deployment": "gpt-4o-realtime-preview"}
    client = await make_bridge(
        emulator_server.make_url("/openai/realtime").with_query(query), {"api-key": AZURE_KEY}
    )
    async with client.ws_connect(PATH) as socket:
        assert (await socket.receive_json())["type"] == "session.created"
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}
        await socket.send_json({"type": "conversation.item.create", "item": item})
        assert (await socket.receive_json())["type"] == "conversation.item.created"
        await socket.send_json({"type": "response.create"})
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.done":
            events.append(await socket.receive_json())
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.text.delta")
    assert [e["text"] for e in events if e["type"] == "response.text.done"] == [deltas]
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == deltas != ""
    assert [json.loads(frame)["type"] for frame in emulator.realtime_frames] == [
        "conversation.item.create",
        "response.create",
    ]


def test_response_create_frames_name_the_deployment_and_keep_every_other_byte() -> None:
    rewrite = response_create_frames({"my-model": "prod-4o"}.__getitem__)
    create = '{"type": "response.create",  "model": "my-model", "input": "hi"}'
    assert rewrite(create) == create.replace('"my-model"', '"prod-4o"')
    nested = '{"type": "response.create", "response": {"model": "my-model", "input": []}}'
    assert rewrite(nested) == nested.replace('"my-model"', '"prod-4o"')
    for unchanged in ('{"type": "response.cancel", "model": "my-model"}', "not json", '{"type": "x"}'):
        assert rewrite(unchanged) == unchanged
