"""Secure by default: client keys, no open relay, SSRF guard, rate limits, limits, secret hygiene."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from azproxy.addresses import is_public
from azproxy.config import ConfigError, Limits, load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.emulator import Emulator
from azproxy.listener import start_server as start_listener
from azproxy.resolver import Resolver
from azproxy.server import build_app

from .conftest import AZURE_KEY, SECRETS, Canary, Proxy, ProxyFactory, ServerFactory, free_port

ALICE, BOB = "sk-alice-client-key-0001", "sk-bob-client-key-0002"
PROXY_PASSWORD = "proxy-pass-for-tests"
SECRETS.update({ALICE, BOB, PROXY_PASSWORD})
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def clients_file(tmp_path: Path) -> Path:
    (tmp_path / "bob.key").write_text(BOB + "\n")
    path = tmp_path / "clients.toml"
    path.write_text(
        f"""
[[client]]
name = "alice"
key = "env:ALICE_KEY"
models = ["gpt-4o"]
rpm = 3

[[client]]
name = "bob"
key = "file:bob.key"

[[client]]
name = "carol"
key = "sha256:{hashlib.sha256(b"carol-key").hexdigest()}"
tpm = 30
"""
    )
    return path


@pytest.fixture
async def guarded(make_proxy: ProxyFactory, clients_file: Path) -> Proxy:
    return await make_proxy(
        AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_CLIENTS_FILE=str(clients_file), ALICE_KEY=ALICE
    )


async def test_client_keys_are_required_and_never_forwarded(guarded: Proxy, emulator: Emulator) -> None:
    async with httpx.AsyncClient(base_url=str(guarded.url)) as client:
        for wrong in ({}, headers(AZURE_KEY), headers("sk-unknown")):
            reply = await client.post("/v1/chat/completions", json=CHAT, headers=wrong)
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
            assert AZURE_KEY not in reply.text
        for key in (ALICE, BOB, "carol-key"):
            reply = await client.post("/v1/chat/completions", json=CHAT, headers=headers(key))
            assert reply.status_code == 200
        api_key_header = await client.post("/v1/chat/completions", json=CHAT, headers={"api-key": BOB})
        assert api_key_header.status_code == 200
    assert len(emulator.received) == 4
    assert all(r.headers.getall("api-key") == [AZURE_KEY] for r in emulator.received)
    assert all("Authorization" not in r.headers for r in emulator.received)


async def test_model_allowlist(guarded: Proxy, emulator: Emulator) -> None:
    async with openai.AsyncOpenAI(base_url=guarded.base_url, api_key=ALICE, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
        assert caught.value.code == "model_not_allowed"
        assert [m.id for m in (await client.models.list()).data] == ["gpt-4o"]
    assert len(emulator.received) == 1


async def test_requests_per_minute(guarded: Proxy, emulator: Emulator) -> None:
    async with httpx.AsyncClient(base_url=str(guarded.url), headers=headers(ALICE)) as client:
        replies = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies[:3]] == ["2", "1", "0"]
    assert replies[0].headers["x-ratelimit-limit-requests"] == "3"
    refused = replies[3]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert len(emulator.received) == 3


async def test_tokens_per_minute_from_usage(guarded: Proxy, emulator: Emulator) -> None:
    async with openai.AsyncOpenAI(base_url=guarded.base_url, api_key="carol-key", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "one two three four five"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = next(iter([c.usage async for c in stream if c.usage]))
        assert usage.total_tokens == 18  # 5 prompt words, 13 answer words
        plain = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "one two three four five"}]
        )
        assert int(plain.headers["x-ratelimit-remaining-tokens"]) == 30 - 18
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert len(emulator.received) == 2


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing; .ci/run installs it")
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def test_rate_limits_shared_through_redis(
    make_proxy: ProxyFactory, clients_file: Path, redis_url: str, emulator: Emulator
) -> None:
    """Two azproxy instances on one Redis enforce one budget between them."""
    settings = {
        "AZURE_OPENAI_TOKEN": AZURE_KEY,
        "AZPROXY_CLIENTS_FILE": str(clients_file),
        "AZPROXY_REDIS_URL": redis_url,
        "ALICE_KEY": ALICE,
    }
    first, second = await make_proxy(**settings), await make_proxy(**settings)
    statuses = []
    for proxy in (first, second, first, second):
        async with httpx.AsyncClient() as client:
            reply = await client.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=headers(ALICE))
            statuses.append(reply.status_code)
    assert statuses == [200, 200, 200, 429]
    assert len(emulator.received) == 3


def test_no_open_relay_by_default() -> None:
    base = {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com", "AZURE_OPENAI_TOKEN": "server-key"}
    with pytest.raises(ConfigError, match="AZPROXY_ALLOW_ANONYMOUS"):
        load_settings(base)
    with pytest.raises(ConfigError):
        load_settings(base | {"AZURE_OPENAI_PROXY_ADDRESS": "[::]:8080"})
    assert load_settings(base | {"AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080"})
    assert load_settings(base | {"AZURE_OPENAI_PROXY_ADDRESS": "[::1]:8080"})
    assert load_settings(base | {"AZPROXY_API_KEYS": f"{ALICE},{BOB}"}).access.clients
    assert load_settings(base | {"AZPROXY_ALLOW_ANONYMOUS": "true"}).access.allow_anonymous
    assert load_settings(
        {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com"}
    )  # clients bring their keys
    with pytest.raises(ConfigError, match="server-side credential"):
        load_settings({"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com", "AZPROXY_API_KEYS": ALICE})


def test_anonymous_start_is_logged_loudly(tmp_path: Path) -> None:
    (tmp_path / "empty.env").write_text("")
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "AZPROXY_ENV_FILE": str(tmp_path / "empty.env"),
        "AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9",
        "AZURE_OPENAI_TOKEN": "server-key-anon",
        "AZPROXY_ALLOW_ANONYMOUS": "true",
        "AZURE_OPENAI_PROXY_ADDRESS": f"0.0.0.0:{port}",
    }
    process = subprocess.Popen([sys.executable, "-m", "azproxy"], env=env, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    with process.stderr:
        try:
            line = process.stderr.readline()
            assert "WARNING" in line
            assert "AZPROXY_ALLOW_ANONYMOUS" in line
            assert "server-key-anon" not in line
        finally:
            process.terminate()
            process.wait(10)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "20.42.0.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert is_public(address)


async def test_openai_mode_tunnel_to_non_public_address_is_refused(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """api.openai.com resolving to a private address (DNS rebinding, a poisoned resolver) is never connected to."""
    canary = Canary()
    canary_port = await canary.start()
    settings = load_settings({"AZURE_OPENAI_PROXY_MODE": "openai", "AZPROXY_STATE_DIR": str(tmp_path)})
    resolver = Resolver({("api.openai.com", 443): ("127.0.0.1", canary_port)})
    server = await start_server(build_app(settings, resolver))
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert canary.connections == 0
    canary.close()
    await canary.wait_closed()


async def test_strict_endpoints_refuse_loopback_azure(
    make_proxy: ProxyFactory, emulator: Emulator, emulator_server: TestServer
) -> None:
    with pytest.raises(ConfigError, match=r"AZURE_OPENAI_ENDPOINT: 127\.0\.0\.1 is not a public address"):
        await make_proxy(AZPROXY_STRICT_ENDPOINTS="true")
    by_name = f"http://localhost:{emulator_server.port}"  # a name: vetted on every connection instead
    proxy = await make_proxy(AZPROXY_STRICT_ENDPOINTS="true", AZURE_OPENAI_ENDPOINT=by_name)
    async with httpx.AsyncClient() as client:
        reply = await client.post(f"{proxy.base_url}/chat/completions", json=CHAT, headers=headers(AZURE_KEY))
    assert reply.status_code == 502
    assert emulator.received == []


async def test_forward_proxy_client_key_in_proxy_authorization(
    start_server: ServerFactory,
    emulator_server: TestServer,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZURE_OPENAI_TOKEN": AZURE_KEY,
            "AZPROXY_API_KEYS": ALICE,
            "AZPROXY_STATE_DIR": str(tmp_path),
        }
    )
    server = await start_server(build_app(settings))
    CertificateAuthority(tmp_path, ["api.openai.com"])
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:{ALICE}@127.0.0.1:{server.port}")
    async with openai.AsyncOpenAI(api_key="anything", max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    monkeypatch.setenv("HTTPS_PROXY", f"http://user:wrong@127.0.0.1:{server.port}")
    async with openai.AsyncOpenAI(api_key="anything", max_retries=0) as client:
        with pytest.raises(openai.APIConnectionError):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert len(emulator.received) == 1
    assert emulator.last.headers["api-key"] == AZURE_KEY
    assert "Proxy-Authorization" not in emulator.last.headers


async def test_allowlisted_plain_forward_needs_a_client_key(
    start_server: ServerFactory, emulator_server: TestServer, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    async def site(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="internal")

    app = web.Application()
    app.router.add_get("/{tail:.*}", site)
    internal = await start_server(app)
    assert internal.port is not None
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZURE_OPENAI_TOKEN": AZURE_KEY,
            "AZPROXY_API_KEYS": ALICE,
            "AZPROXY_TUNNEL_ALLOW": f"127.0.0.1:{internal.port}",
            "AZPROXY_STATE_DIR": str(tmp_path),
        }
    )
    proxy = await start_server(build_app(settings))
    target = f"http://127.0.0.1:{internal.port}/admin"
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{proxy.port}") as client:
        for auth in ({}, headers(ALICE)):  # a key in Authorization belongs to the target, not to azproxy
            assert (await client.get(target, headers=auth)).status_code == 407
    assert seen == []
    async with httpx.AsyncClient(proxy=f"http://user:{ALICE}@127.0.0.1:{proxy.port}") as client:
        reply = await client.get(target, headers={"Authorization": "Bearer site-token"})
    assert reply.text == "internal"
    assert seen[0]["Authorization"] == "Bearer site-token"
    assert "Proxy-Authorization" not in seen[0]


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", None])
async def test_model_allowlist_holds_whatever_the_content_type(
    guarded: Proxy, emulator: Emulator, content_type: str | None
) -> None:
    request_headers = headers(ALICE) | ({"Content-Type": content_type} if content_type else {})
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{guarded.base_url}/responses",
            content=b'{"model": "gpt-4o-mini", "input": "x"}',
            headers=request_headers,
        )
    assert reply.status_code == (403 if content_type is None else 415)  # JSON operations take JSON only
    assert emulator.received == []


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        (
            "chat/completions",
            b'{"model": "gpt-4o", "messages": [], "model": "gpt-4o-mini"}',
            "application/json",
        ),
        (
            "audio/transcriptions",
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nother\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
        ),
    ],
)
async def test_a_model_named_twice_is_refused(
    proxy: Proxy, emulator: Emulator, path: str, body: bytes, content_type: str
) -> None:
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{proxy.base_url}/{path}",
            content=body,
            headers=headers(AZURE_KEY) | {"Content-Type": content_type},
        )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "model"
    assert emulator.received == []


async def test_tokens_are_charged_for_large_json_answers(guarded: Proxy, emulator: Emulator) -> None:
    async with openai.AsyncOpenAI(base_url=guarded.base_url, api_key="carol-key", max_retries=0) as client:
        big = await client.embeddings.with_raw_response.create(
            model="text-embedding-3-small", input=["word"] * 4000, encoding_format="float"
        )
        assert int(big.headers["content-length"]) > 256 * 1024  # above what is buffered anyway
        with pytest.raises(openai.RateLimitError):
            await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert len(emulator.received) == 1


async def test_silent_intercepted_tunnel_is_closed(
    start_server: ServerFactory, emulator_server: TestServer, tmp_path: Path
) -> None:
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_STATE_DIR": str(tmp_path),
            "AZPROXY_HEADER_TIMEOUT": "0.5",
        }
    )
    runner, port = await start_listener(build_app(settings), "127.0.0.1", 0, settings.limits)
    CertificateAuthority(tmp_path, ["api.openai.com"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    await writer.start_tls(
        ssl.create_default_context(cafile=tmp_path / "ca.pem"), server_hostname="api.openai.com"
    )
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the tunnel's first-request deadline
    writer.close()
    await runner.cleanup()


async def test_proxy_headers_never_reach_azure(proxy: Proxy, emulator: Emulator) -> None:
    secret = base64.b64encode(f"u:{PROXY_PASSWORD}".encode()).decode()
    async with httpx.AsyncClient() as client:
        await client.post(
            f"{proxy.base_url}/chat/completions",
            json=CHAT,
            headers={
                **headers(AZURE_KEY),
                "Proxy-Authorization": f"Basic {secret}",
                "Proxy-Connection": "keep-alive",
                "Upgrade": "h2c",
                "TE": "trailers",
            },
        )
    received = {name.lower() for name in emulator.last.headers}
    assert not received & {"proxy-authorization", "proxy-connection", "upgrade", "te", "authorization"}


@pytest.fixture
async def limited(emulator_server: TestServer) -> AsyncIterator[int]:
    """azproxy on its real listener with tight limits; yields the port."""
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_HEADER_TIMEOUT": "0.5",
            "AZPROXY_KEEPALIVE_TIMEOUT": "1",
            "AZPROXY_MAX_CONNECTIONS": "1100",
            "AZPROXY_MAX_CONNECTIONS_PER_IP": "1100",  # every test client is on 127.0.0.1
            "AZPROXY_MAX_HEADERS": "30",
            "AZPROXY_MAX_HEADER_SIZE": "4096",
        }
    )
    runner, port = await start_listener(build_app(settings), "127.0.0.1", 0, settings.limits)
    yield port
    await runner.cleanup()


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + PROXY_PASSWORD.encode()
        + b"a" * 5000
        + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n",
        b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + PROXY_PASSWORD.encode()
        + b"\rb\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: a\nInjected: b\r\n\r\n",
    ],
)
async def test_oversized_or_malformed_heads_are_refused(limited: int, request_bytes: bytes) -> None:
    answer = await raw_exchange(limited, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", answer[:80]
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == "malformed_request"
    assert PROXY_PASSWORD.encode() not in answer  # aiohttp's own answer would quote the bad bytes


async def test_slow_loris_is_cut_and_others_are_served(limited: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    _, trickler = await asyncio.open_connection("127.0.0.1", limited)
    trickler.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{limited}/healthz")).status_code == 200
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the header deadline
    writer.close()
    trickler.close()


async def test_idle_connections_do_not_block_service(limited: int) -> None:
    idle = [await asyncio.open_connection("127.0.0.1", limited) for _ in range(1000)]
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(5):
                assert (await client.get(f"http://127.0.0.1:{limited}/healthz")).status_code == 200
    finally:
        for _, writer in idle:
            writer.close()


async def test_connection_cap(emulator_server: TestServer) -> None:
    limits = Limits(max_connections=5, header_timeout=5)
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/")})
    runner, port = await start_listener(build_app(settings), "127.0.0.1", 0, limits)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    for _, held_writer in held:
        held_writer.close()
    await runner.cleanup()


async def test_idle_keep_alive_is_closed(limited: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", limited)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b'{"status": "ok"}'), 5)
    assert await asyncio.wait_for(reader.read(), 4) == b""
    writer.close()


async def test_error_bodies_never_echo_keys(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=BOB)
    async with httpx.AsyncClient() as client:
        for body in (b"{bad", json.dumps({**CHAT, "model": "../x"}).encode()):
            reply = await client.post(
                f"{proxy.base_url}/chat/completions", content=body, headers=headers(BOB)
            )
            assert reply.status_code == 400
            for secret in (BOB, AZURE_KEY):
                assert secret not in reply.text
