"""Forward proxy: absolute-URI requests (HTTP_PROXY) and CONNECT tunnels (HTTPS_PROXY), intercepted or blind.

Nothing here leaves the machine: public host names are mapped to loopback listeners by azproxy's resolver, and
refusals are proven against a canary listener that must never see a connection.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer

from azproxy.config import load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.emulator import Emulator
from azproxy.resolver import Endpoint, Resolver
from azproxy.server import build_app

from .conftest import AZURE_KEY, Canary, ServerFactory, server_context_for

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


@dataclass
class ForwardProxy:
    server: TestServer
    ca_file: Path
    canary: Canary

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def port(self) -> int:
        port = self.server.port
        assert port is not None
        return port

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


MakeForward = Callable[..., Awaitable[ForwardProxy]]


@pytest.fixture
async def make_forward(
    start_server: ServerFactory, emulator_server: TestServer, tmp_path: Path
) -> AsyncIterator[MakeForward]:
    """azproxy in front of the emulator, with its state in tmp_path; the resolver sends every public name the
    tests use to a canary unless `routes` maps it elsewhere."""

    canaries: list[Canary] = []

    async def make(routes: dict[Endpoint, Endpoint] | None = None, **environment: str) -> ForwardProxy:
        canary = Canary()
        canaries.append(canary)
        canary_port = await canary.start()
        overrides: dict[Endpoint, Endpoint] = {
            (host, port): ("127.0.0.1", canary_port)
            for host in ("api.openai.com", "example.com", "allowed.example")
            for port in (80, 443, 8443)
        }
        overrides |= routes or {}
        source = {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_STATE_DIR": str(tmp_path / "state"),
        } | environment
        settings = load_settings(source)
        server = await start_server(build_app(settings, Resolver(overrides)))
        return ForwardProxy(server, tmp_path / "state" / "ca.pem", canary)

    yield make
    for canary in canaries:
        canary.close()
        await canary.wait_closed()


@pytest.fixture
async def forward(make_forward: MakeForward) -> ForwardProxy:
    proxy = await make_forward()
    CertificateAuthority(
        proxy.ca_file.parent, ["api.openai.com"]
    )  # as `azproxy ca` would, before clients run
    return proxy


async def test_sdk_through_https_proxy_env_only(
    forward: ForwardProxy, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", forward.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(forward.ca_file))
    async with openai.AsyncOpenAI(api_key=AZURE_KEY, max_retries=0) as client:
        assert str(client.base_url) == "https://api.openai.com/v1/"
        answer = await client.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
        )
        assert answer.choices[0].message.content == "Hello from the Azure OpenAI emulator. You said: x"
        assert emulator.last.path == "/openai/deployments/gpt-35-turbo/chat/completions"
        assert emulator.last.headers["api-key"] == AZURE_KEY
        assert "Authorization" not in emulator.last.headers

        stream = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "y"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello from the Azure OpenAI emulator. You said: y"
        assert emulator.last.path == "/openai/deployments/gpt-4o/chat/completions"
    assert forward.canary.connections == 0


async def test_sdk_through_http_proxy_absolute_uri(forward: ForwardProxy, emulator: Emulator) -> None:
    http_client = httpx.AsyncClient(proxy=forward.url)
    async with openai.AsyncOpenAI(
        base_url="http://api.openai.com/v1", api_key=AZURE_KEY, max_retries=0, http_client=http_client
    ) as client:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert emulator.last.path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert emulator.last.query["api-version"] == "2024-10-21"
    assert forward.canary.connections == 0


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_through_connect_and_absolute_uri(forward: ForwardProxy, emulator: Emulator) -> None:
    for url, extra in [
        ("https://api.openai.com/v1/chat/completions", ["--cacert", str(forward.ca_file)]),
        ("http://api.openai.com/v1/chat/completions", []),
    ]:
        process = await asyncio.create_subprocess_exec(
            "curl",
            "-sSN",
            "--max-time",
            "10",
            "-x",
            forward.url,
            *extra,
            url,
            "-H",
            f"Authorization: Bearer {AZURE_KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(STREAM),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr
        assert stdout.endswith(b"data: [DONE]\n\n")
        assert emulator.last.path == "/openai/deployments/gpt-4o/chat/completions"
    assert forward.canary.connections == 0


async def test_requests_and_httpx_through_both_proxy_kinds(forward: ForwardProxy, emulator: Emulator) -> None:
    headers = {"Authorization": f"Bearer {AZURE_KEY}"}
    for url in ("https://api.openai.com/v1/chat/completions", "http://api.openai.com/v1/chat/completions"):
        proxies = {"http": forward.url, "https": forward.url}
        answer = await asyncio.to_thread(
            requests.post,
            url,
            json=CHAT,
            headers=headers,
            proxies=proxies,
            verify=str(forward.ca_file),
            timeout=10,
        )
        assert answer.status_code == 200
        assert answer.json()["model"] == "gpt-4o"  # forward arrivals get OpenAI's shape: the model asked for
        async with httpx.AsyncClient(proxy=forward.url, verify=forward.client_context()) as client:
            reply = await client.post(url, json=CHAT, headers=headers)
        assert reply.status_code == 200
    assert len(emulator.received) == 4
    assert {r.path for r in emulator.received} == {"/openai/deployments/gpt-4o/chat/completions"}


async def open_intercepted(
    forward: ForwardProxy,
    host: str = "api.openai.com",
    server_hostname: str | None = None,
    proxy_auth: str | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.port)
    auth = (
        f"Proxy-Authorization: Basic {base64.b64encode(proxy_auth.encode()).decode()}\r\n"
        if proxy_auth
        else ""
    )
    writer.write(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n{auth}\r\n".encode())
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status.startswith(b"HTTP/1.1 200"), status
    await writer.start_tls(forward.client_context(), server_hostname=server_hostname or host)
    return reader, writer


def raw_request(body: dict[str, object], host: str = "api.openai.com") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {AZURE_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


async def test_several_requests_on_one_tunnel(forward: ForwardProxy, emulator: Emulator) -> None:
    reader, writer = await open_intercepted(forward)
    for word in ("one", "two", "three"):
        writer.write(raw_request({**CHAT, "messages": [{"role": "user", "content": word}]}))
        head, body = await read_response(reader)
        assert head.startswith(b"HTTP/1.1 200")
        assert json.loads(body)["choices"][0]["message"]["content"].endswith(word)
    writer.close()
    assert [r.json()["messages"][0]["content"] for r in emulator.received] == ["one", "two", "three"]


async def test_host_header_inside_tunnel_must_match(forward: ForwardProxy, emulator: Emulator) -> None:
    reader, writer = await open_intercepted(forward)
    writer.write(raw_request(CHAT, host="example.com"))
    head, body = await read_response(reader)
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "tunnel_host_mismatch"
    writer.close()
    assert emulator.received == []
    assert forward.canary.connections == 0


async def test_client_closing_tunnel_mid_stream_closes_upstream(
    forward: ForwardProxy, emulator: Emulator
) -> None:
    emulator.stream_gate = asyncio.Event()
    reader, writer = await open_intercepted(forward)
    writer.write(raw_request(STREAM))
    await asyncio.wait_for(reader.readuntil(b'"content":"Hello '), 5)  # reshaped: OpenAI's shape for tunnels
    writer.transport.abort()
    await asyncio.wait_for(emulator.stream_aborted.wait(), 5)
    assert emulator.streams_finished == 0


async def test_leaf_for_another_name_fails_verification(forward: ForwardProxy) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_intercepted(forward, server_hostname="evil.example")


async def test_ca_cannot_vouch_for_hosts_outside_its_constraints(tmp_path: Path) -> None:
    """Even a leaf the CA key itself signs for another host is refused by clients, thanks to NameConstraints."""
    authority = CertificateAuthority(tmp_path, ["api.openai.com"])
    server_context = server_context_for(authority, "evil.example", tmp_path)
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    client_context = ssl.create_default_context(cafile=authority.cert_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", port, ssl=client_context, server_hostname="evil.example")
    server.close()


@pytest.mark.parametrize("target", ["example.com:443", "api.openai.com:8443", "127.0.0.1:22"])
async def test_connect_to_other_targets_is_refused(forward: ForwardProxy, target: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert json.loads(body)["error"]["code"] == "tunnel_target_forbidden"
    assert forward.canary.connections == 0


async def test_absolute_uri_to_other_hosts_is_refused(forward: ForwardProxy, emulator: Emulator) -> None:
    async with httpx.AsyncClient(proxy=forward.url) as client:
        reply = await client.post(
            "http://example.com/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {AZURE_KEY}"},
        )
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "forward_target_forbidden"
    assert emulator.received == []
    assert forward.canary.connections == 0


@pytest.mark.parametrize("body", [b"{not json", b'{"messages": []}', b'{"model": "a/../b"}'])
async def test_failed_translation_is_never_forwarded_to_named_host(
    forward: ForwardProxy, emulator: Emulator, body: bytes
) -> None:
    async with httpx.AsyncClient(proxy=forward.url) as client:
        reply = await client.post(
            "http://api.openai.com/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {AZURE_KEY}"},
        )
    assert reply.status_code == 400
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert emulator.received == []
    assert forward.canary.connections == 0


async def test_proxy_auth(make_forward: MakeForward, emulator: Emulator) -> None:
    forward = await make_forward(AZPROXY_PROXY_AUTH="alice:s3cret")
    CertificateAuthority(forward.ca_file.parent, ["api.openai.com"])
    url = "http://api.openai.com/v1/chat/completions"
    headers = {"Authorization": f"Bearer {AZURE_KEY}"}
    for proxy_url in (forward.url, forward.url.replace("http://", "http://alice:wrong@")):
        async with httpx.AsyncClient(proxy=proxy_url) as client:
            reply = await client.post(url, json=CHAT, headers=headers)
        assert reply.status_code == 407
        assert reply.headers["Proxy-Authenticate"] == 'Basic realm="azproxy"'
        with pytest.raises(httpx.ProxyError, match="407"):
            async with httpx.AsyncClient(proxy=proxy_url) as client:
                await client.post(url.replace("http:", "https:"), json=CHAT, headers=headers)
    assert emulator.received == []

    good = forward.url.replace("http://", "http://alice:s3cret@")
    async with httpx.AsyncClient(proxy=good, verify=forward.client_context()) as client:
        assert (await client.post(url, json=CHAT, headers=headers)).status_code == 200
        assert (
            await client.post(url.replace("http:", "https:"), json=CHAT, headers=headers)
        ).status_code == 200
    assert len(emulator.received) == 2
    assert all("Proxy-Authorization" not in r.headers for r in emulator.received)

    async with httpx.AsyncClient() as client:  # reverse requests need no proxy credentials
        reply = await client.post(f"{forward.url}/v1/chat/completions", json=CHAT, headers=headers)
    assert reply.status_code == 200


async def tls_upstream(
    start_server: ServerFactory, tmp_path: Path, host: str
) -> tuple[TestServer, list[web.Request]]:
    """A loopback HTTPS server posing as `host`, with a certificate from a CA of its own."""
    authority = CertificateAuthority(tmp_path / "upstream-ca", [host])
    context = authority.context_for(host)
    seen: list[web.Request] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response(
            {"object": "list", "data": [], "seen_auth": request.headers.get("Authorization")}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server = TestServer(app, scheme="https")
    await server.start_server(ssl=context)
    return server, seen


async def test_openai_mode_tunnels_blindly(
    make_forward: MakeForward, start_server: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stand-in for api.openai.com lives on loopback, which the SSRF guard refuses for the real one.
    monkeypatch.setattr("azproxy.resolver.is_public", lambda _address: True)
    upstream, seen = await tls_upstream(start_server, tmp_path, "api.openai.com")
    assert upstream.port is not None
    forward = await make_forward(
        {("api.openai.com", 443): ("127.0.0.1", upstream.port)}, AZURE_OPENAI_PROXY_MODE="openai"
    )
    trust = ssl.create_default_context(cafile=tmp_path / "upstream-ca" / "ca.pem")
    async with httpx.AsyncClient(proxy=forward.url, verify=trust) as client:
        reply = await client.get(
            "https://api.openai.com/v1/models", headers={"Authorization": "Bearer sk-own"}
        )
    assert reply.json()["seen_auth"] == "Bearer sk-own"  # end to end TLS: azproxy could not have changed it
    assert seen[0].path == "/v1/models"
    assert not (tmp_path / "state" / "ca.pem").exists()  # no interception, so no CA was needed
    await upstream.close()


async def test_allowlisted_targets_are_tunnelled_and_relayed(
    make_forward: MakeForward, start_server: ServerFactory, tmp_path: Path
) -> None:
    upstream, seen = await tls_upstream(start_server, tmp_path, "allowed.example")
    plain = await start_server(upstream.app)
    assert upstream.port is not None
    assert plain.port is not None
    forward = await make_forward(
        {
            ("allowed.example", 8443): ("127.0.0.1", upstream.port),
            ("allowed.example", 80): ("127.0.0.1", plain.port),
        },
        AZPROXY_TUNNEL_ALLOW="allowed.example:8443,allowed.example:80",
        AZURE_OPENAI_PROXY_ADDRESS="127.0.0.1:8080",  # a reachable address would need proxy credentials
    )
    trust = ssl.create_default_context(cafile=tmp_path / "upstream-ca" / "ca.pem")
    async with httpx.AsyncClient(proxy=forward.url, verify=trust) as client:
        assert (await client.get("https://allowed.example:8443/a")).status_code == 200
        assert (await client.get("http://allowed.example/b?c=1")).status_code == 200
        with pytest.raises(httpx.ProxyError, match="403"):
            await client.get("https://allowed.example/other-port")
    assert [request.path_qs for request in seen] == ["/a", "/b?c=1"]
    assert forward.canary.connections == 0
    await upstream.close()


async def test_https_listener(
    start_server: ServerFactory,
    emulator_server: TestServer,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AZPROXY_TLS_CERT/KEY: clients reach azproxy itself over TLS, as a reverse proxy and as HTTPS_PROXY."""
    listener_ca = CertificateAuthority(tmp_path / "listener-ca", ["localhost"])
    cert, key = listener_ca.issue("localhost")
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_STATE_DIR": str(tmp_path / "state"),
            "AZPROXY_TLS_CERT": str(tmp_path / "cert.pem"),
            "AZPROXY_TLS_KEY": str(tmp_path / "key.pem"),
        }
    )
    from azproxy.server import tls_context

    server = TestServer(build_app(settings), scheme="https", host="localhost")
    await server.start_server(ssl=tls_context(settings))
    intercept_ca = CertificateAuthority(tmp_path / "state", ["api.openai.com"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(listener_ca.pem() + intercept_ca.pem())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    async with openai.AsyncOpenAI(
        base_url=f"https://localhost:{server.port}/v1", api_key=AZURE_KEY, max_retries=0
    ) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    monkeypatch.setenv("HTTPS_PROXY", f"https://localhost:{server.port}")
    async with openai.AsyncOpenAI(api_key=AZURE_KEY, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert [r.path.split("/")[3] for r in emulator.received] == ["gpt-4o", "gpt-4o-mini"]
    await server.close()


@pytest.mark.parametrize(
    "host", ["api.openai.com:\u0664\u0664\u0663", "api.openai.com:x", "api.openai.com:444"]
)
async def test_a_host_port_that_is_not_the_tunnels_is_a_400(
    forward: ForwardProxy, emulator: Emulator, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await open_intercepted(forward)
    writer.write(raw_request(CHAT, host=host))
    head, body = await read_response(reader)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"]["code"] == "tunnel_host_mismatch"
    assert emulator.received == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_state_directory_that_cannot_hold_the_ca_is_a_503_without_traceback(
    make_forward: MakeForward, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the state directory should be")
    proxy = await make_forward(AZPROXY_STATE_DIR=str(blocked / "state"))
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
        head, body = await read_response(reader)
        writer.close()
        assert head.startswith(b"HTTP/1.1 503 ")
        assert json.loads(body)["error"]["code"] == "certificate_unavailable"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    assert all(r.exc_info is None for r in errors)
    assert "AZPROXY_STATE_DIR" in errors[0].getMessage()
