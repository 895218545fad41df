"""Fixtures: the Azure emulator and azproxy, both in-process on loopback, and the official SDK as the client."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from yarl import URL

from azproxy.config import load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.emulator import Emulator
from azproxy.server import build_app
from azproxy.state import STATE

AZURE_KEY = "azure-key-for-tests"

#: Every secret a test hands azproxy; none may appear in any log record of the whole run (checked at the end).
SECRETS: set[str] = {AZURE_KEY}


class _RecordEverything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


_ALL_LOGS = _RecordEverything()
_ALL_LOGS.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
logging.getLogger().addHandler(_ALL_LOGS)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Secret hygiene over the whole run: keys, tokens and proxy passwords never reach a log line."""
    leaked = sorted(secret for secret in SECRETS if any(secret in line for line in _ALL_LOGS.lines))
    if leaked:
        print(
            f"\nSECRETS FOUND IN LOGS: {len(leaked)} of {len(SECRETS)} (e.g. one starting {leaked[0][:3]}...)"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


ServerFactory = Callable[..., Awaitable[TestServer]]


@dataclass
class Proxy:
    server: TestServer

    @property
    def url(self) -> URL:
        return self.server.make_url("")

    @property
    def base_url(self) -> str:
        return str(self.server.make_url("/v1"))


ProxyFactory = Callable[..., Awaitable[Proxy]]


@pytest.fixture(autouse=True)
def _no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward-proxy variables of one test (or of the machine) must never steer another test's clients."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def emulator() -> Emulator:
    return Emulator(api_keys={AZURE_KEY})


@pytest.fixture
async def start_server(aiohttp_server: ServerFactory) -> ServerFactory:
    """Serve an app the way `azproxy serve` does (aiohttp's test server, too, cancels a handler whose client left)."""

    async def start(app: web.Application) -> TestServer:
        # As serve does, azproxy writes its own access log and reads request bodies as the client encoded
        # them; the emulator and other stand-ins for Azure decode them like any server.
        return await aiohttp_server(app, access_log=None, auto_decompress=STATE not in app)

    return start


@pytest.fixture
async def emulator_server(emulator: Emulator, start_server: ServerFactory) -> TestServer:
    return await start_server(emulator.app())


@pytest.fixture
async def make_proxy(start_server: ServerFactory, emulator_server: TestServer) -> ProxyFactory:
    """azproxy in front of the emulator; keyword arguments are extra environment variables."""

    async def make(**environment: str) -> Proxy:
        source = {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",  # never bound: tests serve on a port of their own
        } | environment
        return Proxy(await start_server(build_app(load_settings(source))))

    return make


@pytest.fixture
async def proxy(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy()


@pytest.fixture
async def sdk(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0)
    yield client
    await client.close()


def free_port() -> int:
    """A loopback port nothing listens on (the kernel picked it and it was let go at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def closed_port() -> int:
    return free_port()


class Canary:
    """A loopback listener standing in for a host azproxy must never reach; it counts connections."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()


def server_context_for(authority: CertificateAuthority, host: str, directory: Path) -> ssl.SSLContext:
    """A TLS server context with a leaf for `host` that `authority` signed (its key and chain in one PEM)."""
    cert, key = authority.issue(host)
    leaf = directory / f"{host}.pem"
    leaf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf)
    return context
