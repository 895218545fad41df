"""One arrival and one admission for every way in: reverse, absolute-URI, tunnel, blind, openai mode."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp.test_utils import TestServer

from azproxy.config import load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.edge.tunnel import Tunnels
from azproxy.emulator import Emulator
from azproxy.server import build_app

from .conftest import AZURE_KEY, SECRETS, Proxy, ServerFactory
from .test_openai_mode import FakeOpenAI

ONLY_4O = "sk-only-gpt-4o-client-0004"
PROXY_PASSWORD = "proxy-password-0005"
SECRETS.update({ONLY_4O, PROXY_PASSWORD})


def clients_file(tmp_path: Path) -> Path:
    path = tmp_path / "clients.toml"
    path.write_text('[[client]]\nname = "only-4o"\nkey = "env:ONLY_4O"\nmodels = ["gpt-4o"]\n')
    return path


async def test_openai_mode_holds_model_allowlists(start_server: ServerFactory, tmp_path: Path) -> None:
    fake = FakeOpenAI()
    upstream: TestServer = await start_server(fake.app())
    settings = load_settings(
        {
            "AZURE_OPENAI_PROXY_MODE": "openai",
            "AZPROXY_OPENAI_BASE_URL": str(upstream.make_url("")).rstrip("/"),
            "AZURE_OPENAI_TOKEN": "sk-server-side",
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
            "AZPROXY_CLIENTS_FILE": str(clients_file(tmp_path)),
            "ONLY_4O": ONLY_4O,
        }
    )
    proxy = Proxy(await start_server(build_app(settings)))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=ONLY_4O, max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="o1-pro", messages=[{"role": "user", "content": "x"}])
        assert refused.value.code == "model_not_allowed"
        with pytest.raises(openai.PermissionDeniedError):  # multipart bodies name their model too
            await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF"))
    assert len(fake.received) == 1
    method, path, headers, body = fake.received[0]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert headers["Authorization"] == "Bearer sk-server-side"
    assert json.loads(body)["model"] == "gpt-4o"  # relayed unchanged: openai mode maps nothing


async def test_the_edge_asks_the_tunnel_registry_once_per_request(
    start_server: ServerFactory,
    emulator_server: TestServer,
    emulator: Emulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[object] = []
    original = Tunnels.arrival_for

    def counting(self: Tunnels, handler: object) -> object:
        asked.append(handler)
        return original(self, handler)  # type: ignore[arg-type]

    monkeypatch.setattr(Tunnels, "arrival_for", counting)
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_STATE_DIR": str(tmp_path),
        }
    )
    server = await start_server(build_app(settings))
    CertificateAuthority(tmp_path, ["api.openai.com"])
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.port}")
    async with openai.AsyncOpenAI(api_key=AZURE_KEY, max_retries=0) as client:
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        await client.models.list()
    chats = [r for r in emulator.received if r.path.endswith("/chat/completions")]
    assert len(chats) == 3
    assert len(asked) == 4  # the CONNECT asks nothing; each of the 4 requests inside the tunnel once
    assert len(set(map(id, asked))) == 1  # all on the one tunnel's connection


async def test_proxy_url_credentials_alone_satisfy_proxy_auth_and_client_keys(
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
            "AZPROXY_CLIENTS_FILE": str(clients_file(tmp_path)),
            "ONLY_4O": ONLY_4O,
            "AZPROXY_PROXY_AUTH": f"operator:{PROXY_PASSWORD}",
            "AZPROXY_STATE_DIR": str(tmp_path),
        }
    )
    server = await start_server(build_app(settings))
    CertificateAuthority(tmp_path, ["api.openai.com"])
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://anyone:{ONLY_4O}@127.0.0.1:{server.port}")
    async with openai.AsyncOpenAI(api_key="unused", max_retries=0) as client:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(
            openai.PermissionDeniedError
        ):  # the tunnel's client, and its allowlist, hold inside
            await client.chat.completions.create(model="o1", messages=[{"role": "user", "content": "x"}])
    async with httpx.AsyncClient(proxy=f"http://anyone:not-a-key@127.0.0.1:{server.port}") as client:
        reply = await client.post("http://api.openai.com/v1/chat/completions", json={"model": "gpt-4o"})
        assert reply.status_code == 407
    assert len(emulator.received) == 1
    assert "Proxy-Authorization" not in emulator.last.headers


async def test_refused_forward_targets_never_reach_azproxys_own_routes(
    start_server: ServerFactory, emulator_server: TestServer
) -> None:
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/")})
    server = await start_server(build_app(settings))
    async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{server.port}") as client:
        for path in ("/healthz", "/v1/models"):
            reply = await client.get(f"http://elsewhere.example{path}")
            assert reply.status_code == 403
            assert reply.json()["error"]["code"] == "forward_target_forbidden"
