"""What azproxy answers itself: CORS, model listing, health."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from azproxy.config import load_settings
from azproxy.emulator import Emulator
from azproxy.server import build_app

from .conftest import AZURE_KEY, Proxy, ProxyFactory, ServerFactory


async def test_preflight_on_any_path(proxy: Proxy, emulator: Emulator) -> None:
    headers = {
        "Origin": "https://chat.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-stainless-os, Content-Type",
    }
    async with aiohttp.ClientSession() as session:
        for path in ("v1/chat/completions", "anything/at/all"):
            async with session.options(proxy.url / path, headers=headers) as response:
                assert 200 <= response.status < 300
                assert response.headers["Access-Control-Allow-Origin"] == "*"
                allowed = {h.strip() for h in response.headers["Access-Control-Allow-Headers"].split(",")}
                assert {"authorization", "content-type", "api-key", "x-stainless-os"} <= allowed
                assert "POST" in response.headers["Access-Control-Allow-Methods"]
                assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert emulator.received == []


async def test_every_response_allows_any_origin(proxy: Proxy) -> None:
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {AZURE_KEY}"}) as session:
        for method, path, body in [
            ("POST", "v1/chat/completions", chat),
            ("POST", "v1/chat/completions", None),
            ("GET", "healthz", None),
            ("GET", "v1/models", None),
            ("POST", "v1/chat/completions", {**chat, "stream": True}),
        ]:
            async with session.request(method, proxy.url / path, json=body) as response:
                await response.read()
                assert response.headers["Access-Control-Allow-Origin"] == "*", (method, path, body)


async def test_models_with_sdk(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(AZURE_OPENAI_MODEL_MAPPER="gpt-4o=prod-4o")
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as client:
        models = {m.id: m for m in (await client.models.list()).data}
        assert models["gpt-4o"].model_extra == {"deployment": "prod-4o"}
        assert models["gpt-3.5-turbo"].model_extra == {"deployment": "gpt-35-turbo"}
        assert "prod-4o" in models
        assert all(m.object == "model" and m.owned_by and m.created for m in models.values())
        one = await client.models.retrieve("gpt-4o")
        assert one.id == "gpt-4o"
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("no-such-model")
        assert caught.value.code == "model_not_found"
        # Deployments Azure reports join the mapper's models, asked once and then cached.
        assert models["whisper"].model_extra == {"deployment": "whisper"}
        assert models["gpt-4o-realtime-preview"].model_extra == {"deployment": "gpt-4o-realtime-preview"}
    assert [(r.path, r.query["api-version"]) for r in emulator.received] == [
        ("/openai/deployments", "2022-12-01")
    ]
    assert emulator.received[0].headers["api-key"] == AZURE_KEY


async def test_models_fall_back_to_the_mapper(start_server: ServerFactory, closed_port: int) -> None:
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": f"http://127.0.0.1:{closed_port}"})
    proxy = Proxy(await start_server(build_app(settings)))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as client:
        ids = {m.id for m in (await client.models.list()).data}
    assert ids == set(settings.model_map) | set(settings.model_map.values())


@pytest.mark.parametrize(("method", "path"), [("GET", "healthz"), ("GET", "health"), ("HEAD", "")])
async def test_health_answers_without_azure(proxy: Proxy, emulator: Emulator, method: str, path: str) -> None:
    async with aiohttp.ClientSession() as session, session.request(method, proxy.url / path) as response:
        assert response.status == 200
    assert emulator.received == []
