"""What web pages can do with azproxy: CORS by who holds the credential, JSON bodies only, and no DNS rebinding."""

from __future__ import annotations

import httpx
import pytest
from aiohttp.test_utils import TestServer

from azproxy.browser import EXPOSED_HEADERS
from azproxy.emulator import Emulator

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory

CLIENT_KEY = "sk-browser-client-key-0001"
SECRETS.add(CLIENT_KEY)
CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
JSON = {"Content-Type": "application/json"}
#: The set-up the no-open-relay check lets start: a server credential, loopback, no client keys.
ANONYMOUS = {"AZURE_OPENAI_TOKEN": AZURE_KEY}
CORS_ANSWER = ("Access-Control-Allow-Origin", "Access-Control-Allow-Private-Network")
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type, x-stainless-os, openai-beta",
    "Access-Control-Request-Private-Network": "true",
}


async def chat(proxy: Proxy, headers: dict[str, str], body: bytes = CHAT) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(f"{proxy.base_url}/chat/completions", content=body, headers=headers)


async def preflight(proxy: Proxy, origin: str) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.options(
            f"{proxy.base_url}/chat/completions", headers=PREFLIGHT | {"Origin": origin}
        )


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://localhost:3000"])
async def test_anonymous_loopback_answers_no_origin(
    make_proxy: ProxyFactory, emulator: Emulator, origin: str
) -> None:
    proxy = await make_proxy(**ANONYMOUS)
    reply = await chat(proxy, JSON | {"Origin": origin})
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "origin_not_allowed"
    assert not any(name in reply.headers for name in CORS_ANSWER)
    refused = await preflight(proxy, origin)
    assert refused.status_code == 403
    assert not any(name in refused.headers for name in CORS_ANSWER)
    assert emulator.received == []


async def test_anonymous_loopback_still_serves_clients_that_are_no_page(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    reply = await chat(await make_proxy(**ANONYMOUS), JSON)
    assert reply.status_code == 200
    assert "Access-Control-Allow-Origin" not in reply.headers
    assert emulator.last.headers["api-key"] == AZURE_KEY


async def test_a_configured_origin_is_answered_as_itself(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    origin = "https://chat.example.com"
    proxy = await make_proxy(**ANONYMOUS, AZPROXY_CORS_ORIGINS=f"{origin}, http://localhost:3000")
    reply = await chat(proxy, JSON | {"Origin": origin})
    assert reply.status_code == 200
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    assert "origin" in reply.headers["Vary"].lower()
    allowed = await preflight(proxy, origin)
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == origin
    assert allowed.headers["Access-Control-Allow-Private-Network"] == "true"
    names = {h.strip() for h in allowed.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "api-key", "content-type", "x-stainless-os", "openai-beta"} <= names
    assert (await chat(proxy, JSON | {"Origin": "https://chat.example.com.evil.example"})).status_code == 403
    assert len(emulator.received) == 1


async def test_configured_origins_hold_with_client_keys_too(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy(
        **ANONYMOUS, AZPROXY_API_KEYS=CLIENT_KEY, AZPROXY_CORS_ORIGINS="https://chat.example.com"
    )
    key = {"Authorization": f"Bearer {CLIENT_KEY}"}
    refused = await chat(proxy, JSON | key | {"Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert "Access-Control-Allow-Origin" not in refused.headers
    assert (await preflight(proxy, "https://evil.example")).status_code == 403
    assert emulator.received == []


@pytest.mark.parametrize(
    "environment",
    [
        {},  # clients bring their own Azure key
        ANONYMOUS | {"AZPROXY_API_KEYS": CLIENT_KEY},
    ],
    ids=["own-azure-key", "client-keys"],
)
async def test_where_every_request_carries_a_key_any_origin_is_answered(
    make_proxy: ProxyFactory, environment: dict[str, str]
) -> None:
    proxy = await make_proxy(**environment)
    key = CLIENT_KEY if environment else AZURE_KEY
    reply = await chat(proxy, JSON | {"Origin": "https://any.example", "Authorization": f"Bearer {key}"})
    assert reply.status_code == 200
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    exposed = {h.strip() for h in reply.headers["Access-Control-Expose-Headers"].split(",")}
    assert exposed == set(EXPOSED_HEADERS)
    assert {"x-request-id", "x-ratelimit-remaining-tokens", "retry-after-ms"} <= exposed
    assert (await preflight(proxy, "https://any.example")).headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("mode", ["azure", "openai"])
@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ],
)
async def test_simple_requests_never_reach_the_upstream(
    make_proxy: ProxyFactory, emulator: Emulator, emulator_server: TestServer, mode: str, content_type: str
) -> None:
    """A page may POST these without a preflight; openai mode relays bodies unchanged, and refuses them too."""
    upstream = str(emulator_server.make_url("")).rstrip("/")
    proxy = await make_proxy(**ANONYMOUS, AZURE_OPENAI_PROXY_MODE=mode, AZPROXY_OPENAI_BASE_URL=upstream)
    reply = await chat(proxy, {"Content-Type": content_type})
    assert reply.status_code == 415
    assert "Content-Type: application/json" in reply.json()["error"]["message"]
    assert emulator.received == []


@pytest.mark.parametrize("headers", [{"Content-Type": "application/json; charset=utf-8"}, {}])
async def test_json_with_parameters_or_no_content_type_passes(
    make_proxy: ProxyFactory, emulator: Emulator, headers: dict[str, str]
) -> None:
    reply = await chat(await make_proxy(**ANONYMOUS), headers)
    assert reply.status_code == 200
    assert len(emulator.received) == 1


async def test_a_foreign_host_finds_nothing_on_loopback(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(**ANONYMOUS, AZPROXY_ALLOWED_HOSTS="azproxy.internal")
    port = proxy.server.port
    refused = await chat(proxy, JSON | {"Host": f"evil.example:{port}"})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "host_not_allowed"
    assert emulator.received == []
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"azproxy.internal:{port}", "LocalHost"):
        assert (await chat(proxy, JSON | {"Host": host})).status_code == 200, host
    assert len(emulator.received) == 4


async def test_allowed_hosts_hold_on_any_address(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    key = {"Authorization": f"Bearer {AZURE_KEY}"}
    open_address = {"AZURE_OPENAI_PROXY_ADDRESS": "0.0.0.0:8080"}
    anything_goes = await make_proxy(**open_address)
    assert (await chat(anything_goes, JSON | key | {"Host": "whatever.example"})).status_code == 200
    guarded = await make_proxy(**open_address, AZPROXY_ALLOWED_HOSTS="azproxy.example.com")
    assert (await chat(guarded, JSON | key | {"Host": "whatever.example"})).status_code == 400
    assert (await chat(guarded, JSON | key | {"Host": "azproxy.example.com:8080"})).status_code == 200
    assert len(emulator.received) == 2


async def test_forward_arrivals_name_their_host(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(**ANONYMOUS)
    async with httpx.AsyncClient(proxy=str(proxy.url)) as client:
        reply = await client.post("http://api.openai.com/v1/chat/completions", content=CHAT, headers=JSON)
    assert reply.status_code == 200
    assert len(emulator.received) == 1


async def test_server_header_names_no_versions(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient() as client:
        for reply in (
            await client.get(str(proxy.url / "healthz")),
            await client.post(f"{proxy.base_url}/chat/completions", json={}, headers={"api-key": AZURE_KEY}),
            await client.post(
                f"{proxy.base_url}/chat/completions", content=CHAT, headers=JSON | {"api-key": AZURE_KEY}
            ),
        ):
            assert reply.headers["Server"] == "azproxy"
