"""`azproxy health`, Docker's HEALTHCHECK: it finds the running azproxy from the same settings serve reads."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from azproxy.check import health_url
from azproxy.cli import main
from azproxy.config import load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.server import build_app, tls_context

from .conftest import Proxy, ServerFactory


@pytest.fixture(autouse=True)
def _no_stray_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for name in (
        "AZURE_OPENAI_TOKEN",
        "AZPROXY_CONFIG",
        "AZPROXY_ENV_FILE",
        "AZPROXY_TLS_CERT",
        "AZPROXY_TLS_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


async def _health(monkeypatch: pytest.MonkeyPatch, address: str) -> int:
    monkeypatch.setenv("AZURE_OPENAI_PROXY_ADDRESS", address)
    return await asyncio.to_thread(main, ["health", "--timeout", "2"])


async def test_a_running_server_is_healthy(proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await _health(monkeypatch, f"127.0.0.1:{proxy.server.port}") == 0


async def test_nothing_listening_is_unhealthy(closed_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await _health(monkeypatch, f"127.0.0.1:{closed_port}") == 1


@pytest.mark.parametrize(
    ("address", "url"),
    [
        ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
        (":8080", "http://127.0.0.1:8080/healthz"),
        ("[::]:8080", "http://[::1]:8080/healthz"),
        ("[::1]:9000", "http://[::1]:9000/healthz"),
        ("localhost:8443", "http://localhost:8443/healthz"),
    ],
)
def test_a_wildcard_address_is_asked_through_loopback(address: str, url: str) -> None:
    assert health_url(load_settings({"AZURE_OPENAI_PROXY_ADDRESS": address}, require_endpoint=False)) == url


async def test_https_when_azproxy_serves_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aiohttp_server: ServerFactory
) -> None:
    """With AZPROXY_TLS_CERT/KEY set, serve listens on HTTPS; health asks there (the certificate is not vetted)."""
    cert, key = CertificateAuthority(tmp_path / "ca", ["127.0.0.1"]).issue("127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    tls = {"AZPROXY_TLS_CERT": str(tmp_path / "cert.pem"), "AZPROXY_TLS_KEY": str(tmp_path / "key.pem")}
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": "http://127.0.0.1:9"} | tls)
    server = await aiohttp_server(build_app(settings), ssl=tls_context(settings))
    address = f"127.0.0.1:{server.port}"
    source = {"AZURE_OPENAI_PROXY_ADDRESS": address} | tls
    assert health_url(load_settings(source, require_endpoint=False)) == f"https://{address}/healthz"
    for name, value in tls.items():
        monkeypatch.setenv(name, value)
    assert await _health(monkeypatch, address) == 0
