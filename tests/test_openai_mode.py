"""openai mode: a plain relay, path, Authorization and body unchanged, streams piped the same way."""

from __future__ import annotations

import json

import openai
from aiohttp import web
from aiohttp.test_utils import TestServer

from azproxy.config import load_settings
from azproxy.server import build_app

from .conftest import Proxy, ServerFactory


class FakeOpenAI:
    """Stands in for api.openai.com and records what it received."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.answer)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((request.method, request.path_qs, dict(request.headers), body))
        if request.path == "/v1/models":
            return web.json_response(
                {
                    "object": "list",
                    "data": [{"id": "gpt-4o", "object": "model", "created": 1, "owned_by": "openai"}],
                }
            )
        document = json.loads(body)
        if not document.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "gpt-4o",
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "from openai"},
                        }
                    ],
                }
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("from ", "openai"):
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response


async def start(start_server: ServerFactory) -> tuple[FakeOpenAI, Proxy]:
    fake = FakeOpenAI()
    upstream: TestServer = await start_server(fake.app())
    settings = load_settings(
        {
            "AZURE_OPENAI_PROXY_MODE": "openai",
            "AZPROXY_OPENAI_BASE_URL": str(upstream.make_url("")).rstrip("/"),
        }
    )
    return fake, Proxy(await start_server(build_app(settings)))


async def test_openai_mode_relays_unchanged(start_server: ServerFactory) -> None:
    fake, proxy = await start(start_server)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0) as client:
        answer = await client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "from openai"
        method, path, headers, body = fake.received[-1]
        assert (method, path) == ("POST", "/v1/chat/completions")
        assert headers["Authorization"] == "Bearer sk-client"
        assert "api-key" not in headers
        assert json.loads(body) == {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}

        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "from openai"

        models = await client.models.list()  # relayed to OpenAI, not answered from the mapper
        assert [m.owned_by for m in models.data] == ["openai"]
        assert fake.received[-1][1] == "/v1/models"
