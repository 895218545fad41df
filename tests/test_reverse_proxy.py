"""Reverse proxy, azure mode: the official SDK and raw HTTP through azproxy to the emulator."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from azproxy.config import load_settings
from azproxy.emulator import Emulator
from azproxy.server import build_app

from .conftest import AZURE_KEY, Proxy, ProxyFactory, ServerFactory

API_VERSION = "2024-10-21"


def assert_azure_call(emulator: Emulator, deployment: str, operation: str, key: str = AZURE_KEY) -> None:
    call = emulator.last
    assert call.path == f"/openai/deployments/{deployment}/{operation}"
    assert call.query.getall("api-version") == [API_VERSION]
    assert call.headers.getall("api-key") == [key]
    assert "Authorization" not in call.headers


async def test_chat_with_sdk(sdk: openai.AsyncOpenAI, emulator: Emulator) -> None:
    answer = await sdk.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": "ping"}], temperature=0.2
    )
    assert answer.choices[0].message.content == "Hello from the Azure OpenAI emulator. You said: ping"
    assert answer.model == "gpt-35-turbo"
    assert_azure_call(emulator, "gpt-35-turbo", "chat/completions")
    assert emulator.last.json() == {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "ping"}],
        "temperature": 0.2,
    }


async def test_completions_with_sdk(sdk: openai.AsyncOpenAI, emulator: Emulator) -> None:
    answer = await sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=5)
    assert answer.choices[0].text.endswith("You said: Say hi")
    assert_azure_call(emulator, "gpt-35-turbo-instruct", "completions")
    assert emulator.last.json()["max_tokens"] == 5


async def test_embeddings_with_sdk(sdk: openai.AsyncOpenAI, emulator: Emulator) -> None:
    answer = await sdk.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [len(item.embedding) for item in answer.data] == [16, 16]
    assert_azure_call(emulator, "text-embedding-3-small", "embeddings")
    assert emulator.last.json()["input"] == ["a", "b"]


async def test_unmapped_model_passes_verbatim_and_mapper_overrides(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy(AZURE_OPENAI_MODEL_MAPPER="gpt-4o=gpt-4o-mini")
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as client:
        await client.chat.completions.create(
            model="gpt-4.1-mini", messages=[{"role": "user", "content": "x"}]
        )
        assert_azure_call(emulator, "gpt-4.1-mini", "chat/completions")
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        assert_azure_call(emulator, "gpt-4o-mini", "chat/completions")
        assert emulator.last.json()["model"] == "gpt-4o"


async def test_server_token_replaces_client_key(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY)
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="whatever-the-client-has", max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert_azure_call(emulator, "gpt-4o", "chat/completions")


async def post(
    proxy: Proxy,
    path: str,
    body: bytes | dict[str, object],
    headers: dict[str, str] | None = None,
) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Authorization": f"Bearer {AZURE_KEY}", "Content-Type": "application/json"} | (
        headers or {}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url.join(URL(path)), data=io.BytesIO(data), headers=all_headers) as response,
    ):
        return response.status, response.headers, await response.read()


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


async def test_body_headers_and_query_as_sent(proxy: Proxy, emulator: Emulator) -> None:
    raw = b'{ "model" : "gpt-4o",\n "messages": [{"role": "user", "content": "h\\u00e9"}], "n": 1 }'
    status, headers, _ = await post(
        proxy,
        "/v1/chat/completions?api-version=2024-06-01&trace=yes",
        raw,
        {"x-ms-client-request-id": "req-42", "OpenAI-Organization": "org-x", "Connection": "keep-alive"},
    )
    assert status == 200
    call = emulator.last
    assert call.body == raw
    assert call.query.getall("api-version") == ["2024-06-01"]
    assert call.query["trace"] == "yes"
    assert call.headers["x-ms-client-request-id"] == "req-42"
    assert call.headers["Host"] == proxy_host(emulator)
    assert "OpenAI-Organization" not in call.headers
    assert "Authorization" not in call.headers
    for name in ("apim-request-id", "x-request-id", "x-ratelimit-remaining-requests", "x-ms-region"):
        assert name in headers


def proxy_host(emulator: Emulator) -> str:
    return emulator.last.url.raw_authority


async def test_client_api_key_header(proxy: Proxy, emulator: Emulator) -> None:
    status, _, _ = await post(proxy, "/chat/completions", CHAT, {"Authorization": "", "api-key": AZURE_KEY})
    assert status == 200
    assert_azure_call(emulator, "gpt-4o", "chat/completions")


async def test_azure_errors_pass_through_unchanged(proxy: Proxy, emulator: Emulator) -> None:
    status, _, body = await post(proxy, "/v1/chat/completions", {**CHAT, "model": "no-such-deployment"})
    assert status == 404
    assert json.loads(body)["error"]["code"] == "DeploymentNotFound"

    emulator.fail_next(429, retry_after=7)
    status, headers, body = await post(proxy, "/v1/chat/completions", CHAT)
    assert status == 429
    assert headers["retry-after"] == "7"
    assert headers["retry-after-ms"] == "7000"

    status, _, body = await post(
        proxy,
        "/v1/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "__content_filter__"}]},
    )
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "content_filter"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True

    status, _, _ = await post(proxy, "/v1/chat/completions", CHAT, {"Authorization": "Bearer wrong-key"})
    assert status == 401


async def test_large_body_passes_and_too_large_is_refused(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy(AZPROXY_MAX_BODY="3M")
    big = {"model": "text-embedding-3-small", "input": "x" * (2 * 1024 * 1024)}
    status, _, _ = await post(proxy, "/v1/embeddings", big)
    assert status == 200
    assert len(emulator.last.body) > 2 * 1024 * 1024

    calls = len(emulator.received)
    status, _, body = await post(proxy, "/v1/embeddings", {**big, "input": "x" * (4 * 1024 * 1024)})
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert len(emulator.received) == calls


async def test_default_limit_is_32_mib(proxy: Proxy, emulator: Emulator) -> None:
    status, _, _ = await post(proxy, "/v1/embeddings", b"{" + b" " * (32 * 1024 * 1024) + b"}")
    assert status == 413
    assert emulator.received == []


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{oops", 400, "invalid_json"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "missing_model"),
        ("/v1/chat/completions", b'{"model": "../../x"}', 400, "invalid_model"),
        ("/v1/not/an/operation", b"{}", 404, "unknown_url"),
    ],
)
async def test_own_errors_are_openai_shaped_and_nothing_is_forwarded(
    proxy: Proxy, emulator: Emulator, path: str, body: bytes, status: int, code: str
) -> None:
    got_status, headers, got_body = await post(proxy, path, body)
    assert got_status == status
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(got_body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert emulator.received == []


async def test_missing_key_is_401_and_not_forwarded(proxy: Proxy, emulator: Emulator) -> None:
    status, _, body = await post(proxy, "/v1/chat/completions", CHAT, {"Authorization": ""})
    assert status == 401
    assert json.loads(body)["error"]["code"] == "missing_api_key"
    assert emulator.received == []


async def test_wrong_method_is_405(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session, session.get(proxy.url / "v1/chat/completions") as response:
        assert response.status == 405
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_unreachable_upstream_is_502(start_server: ServerFactory, closed_port: int) -> None:
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{closed_port}"})
    server = await start_server(build_app(settings))
    status, _, body = await post(Proxy(server), "/v1/chat/completions", CHAT)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"


async def slow_upstream(start_server: ServerFactory, delay: float) -> TestServer:
    async def answer_late(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer_late)
    return await start_server(app)


async def test_silent_upstream_is_504(start_server: ServerFactory) -> None:
    upstream = await slow_upstream(start_server, 5)
    settings = load_settings(
        {"AZURE_OPENAI_ENDPOINT": str(upstream.make_url("")).rstrip("/"), "AZPROXY_READ_TIMEOUT": "0.2"}
    )
    server = await start_server(build_app(settings))
    status, _, body = await post(Proxy(server), "/v1/chat/completions", CHAT)
    assert status == 504
    assert json.loads(body)["error"]["code"] == "upstream_timeout"


async def raw_upstream(answer: bytes) -> asyncio.Server:
    """An upstream that reads a request head and answers `answer` verbatim, then closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_answer_broken_before_it_is_sent_is_502(start_server: ServerFactory) -> None:
    upstream = await raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )
    port = upstream.sockets[0].getsockname()[1]
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{port}"})
    server = await start_server(build_app(settings))
    status, _, body = await post(Proxy(server), "/v1/chat/completions", CHAT)
    upstream.close()
    await upstream.wait_closed()
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_broken"
