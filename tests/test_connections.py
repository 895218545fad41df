"""The upstream connection pool against raw-socket backends: what goes on the wire, keep-alive reuse, a backend
that closes idle connections, answers without a length, the idle bound, and TLS verification."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from azproxy import connections
from azproxy.config import load_settings
from azproxy.connections import Connections, _head
from azproxy.edge.certs import CertificateAuthority
from azproxy.resolver import Resolver
from azproxy.server import build_app

from .conftest import AZURE_KEY, Proxy, ServerFactory, server_context_for

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
ANSWER = json.dumps({"id": "c", "object": "chat.completion", "choices": []}).encode()
HEADERS = {"Authorization": f"Bearer {AZURE_KEY}"}

#: What a connection does with its n-th request (0-based): answer it whole ("answer"), after a 103 ("hints"),
#: then send a stray answer ("stray"); answer without a length and close ("eof"); close without answering
#: ("close"), or with a RST ("reset"); answer with a status line that does not parse ("garbage").
Behaviour = Callable[[int], str]


@dataclass
class RawBackend:
    """A backend on a plain socket, recording every request head and body it reads, per connection."""

    behaviour: Behaviour
    delay: float = 0.0
    tls: ssl.SSLContext | None = None
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    opened: int = 0
    closed: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            for index in range(100):
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                self.bodies.append(await reader.readexactly(length))
                await asyncio.sleep(self.delay)
                action = self.behaviour(index)
                if action == "reset":  # closed with a RST, as a backend's idle-connection reaper may
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
                if action == "close":
                    break
                if action == "garbage":  # not HTTP at all
                    writer.write(b"HTTP/1.1 two hundred OK\r\n\r\n")
                    await writer.drain()
                    continue
                if action == "hints":
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n")
                if action == "eof":
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + ANSWER)
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(ANSWER), ANSWER)
                )
                await writer.drain()
                if action == "stray":  # an answer nobody asked for, while the connection is idle
                    await asyncio.sleep(0.1)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{stray}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed += 1
            self.changed.set()
            writer.close()

    async def wait_closed(self, count: int) -> None:
        while self.closed < count:
            self.changed.clear()
            await self.changed.wait()


@pytest.fixture
async def backends() -> AsyncIterator[list[RawBackend]]:
    started: list[RawBackend] = []
    yield started
    for backend in started:
        assert backend.server is not None
        backend.server.close()


async def proxy_to(
    start_server: ServerFactory,
    backends: list[RawBackend],
    backend: RawBackend,
    endpoint: str | None = None,
    resolver: Resolver | None = None,
) -> Proxy:
    backends.append(backend)
    port = backend.port or await backend.start()
    settings = load_settings({"AZURE_OPENAI_ENDPOINT": endpoint or f"http://127.0.0.1:{port}"})
    return Proxy(await start_server(build_app(settings, resolver)))


async def chat(proxy: Proxy, session: aiohttp.ClientSession) -> tuple[int, bytes]:
    async with session.post(proxy.url / "v1/chat/completions", json=CHAT, headers=HEADERS) as response:
        return response.status, await response.read()


async def chats(proxy: Proxy, count: int) -> list[tuple[int, bytes]]:
    """`count` chats one after the other on one client connection."""
    async with aiohttp.ClientSession() as session:
        return [await chat(proxy, session) for _ in range(count)]


async def test_requests_go_out_whole_on_one_kept_connection(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    backend = RawBackend(lambda _index: "answer")
    proxy = await proxy_to(start_server, backends, backend)
    assert await chats(proxy, 5) == [(200, ANSWER)] * 5
    assert backend.opened == 1
    assert len(backend.heads) == 5
    for head, body in zip(backend.heads, backend.bodies, strict=True):
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21 HTTP/1.1"
        names = [line.split(":")[0].lower() for line in lines[1:] if line]
        assert names.count("host") == 1
        assert names.count("content-length") == 1
        assert f"Host: 127.0.0.1:{backend.port}" in lines
        assert f"Content-Length: {len(body)}" in lines
        assert f"api-key: {AZURE_KEY}" in lines
        assert "authorization" not in names
        assert json.loads(body) == CHAT


async def test_a_kept_connection_the_backend_dropped_is_replaced_unseen(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    """Each connection answers its first request and drops the next unanswered, the race of a backend closing
    an idle connection as a request goes out: the request is sent again on a new connection, once."""
    backend = RawBackend(lambda index: "answer" if index == 0 else "close")
    proxy = await proxy_to(start_server, backends, backend)
    assert await chats(proxy, 3) == [(200, ANSWER)] * 3
    assert backend.opened == 3
    assert len(backend.heads) == 5  # requests 2 and 3 each went out twice: on the dropped and the new one


async def test_a_kept_connection_the_backend_reset_is_replaced_unseen(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    backend = RawBackend(lambda index: "answer" if index == 0 else "reset")
    proxy = await proxy_to(start_server, backends, backend)
    assert await chats(proxy, 3) == [(200, ANSWER)] * 3
    assert backend.opened == 3


async def test_a_kept_connection_dropped_after_work_is_not_sent_again(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    """A backend that drops the connection only after working on the request may have done the work (a chat
    billed, a batch created): past RETRY_WINDOW_SECONDS the request is not sent a second time."""
    backend = RawBackend(lambda index: "answer" if index == 0 else "close", delay=0.5)
    proxy = await proxy_to(start_server, backends, backend)
    async with aiohttp.ClientSession() as session:
        assert await chat(proxy, session) == (200, ANSWER)
        status, body = await chat(proxy, session)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    assert len(backend.heads) == 2
    assert backend.opened == 1


async def test_a_new_connection_dropped_unanswered_is_a_502_without_a_retry(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    backend = RawBackend(lambda _index: "close")
    proxy = await proxy_to(start_server, backends, backend)
    async with aiohttp.ClientSession() as session:
        status, body = await chat(proxy, session)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"
    assert backend.opened == 1
    assert len(backend.heads) == 1


async def test_an_answer_without_a_length_is_read_until_the_backend_closes(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    backend = RawBackend(lambda _index: "eof")
    proxy = await proxy_to(start_server, backends, backend)
    assert await chats(proxy, 2) == [(200, ANSWER)] * 2
    assert backend.opened == 2  # such a connection cannot carry a second request


async def test_idle_connections_beyond_the_bound_are_closed(
    start_server: ServerFactory, backends: list[RawBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "MAX_IDLE_PER_ORIGIN", 2)
    backend = RawBackend(lambda _index: "answer", delay=0.2)
    proxy = await proxy_to(start_server, backends, backend)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(chat(proxy, session) for _ in range(5)))
        assert answers == [(200, ANSWER)] * 5
        assert backend.opened == 5
        async with asyncio.timeout(5):
            await backend.wait_closed(3)
        await asyncio.sleep(0.1)
        assert backend.closed == 3  # two stay open for the next requests
        assert await chat(proxy, session) == (200, ANSWER)
    assert backend.opened == 5


async def test_informational_answers_are_skipped_and_the_connection_kept(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    backend = RawBackend(lambda _index: "hints")
    proxy = await proxy_to(start_server, backends, backend)
    assert await chats(proxy, 3) == [(200, ANSWER)] * 3
    assert backend.opened == 1


async def test_bytes_a_backend_sends_unasked_never_answer_the_next_request(
    start_server: ServerFactory, backends: list[RawBackend]
) -> None:
    """A stray answer on an idle connection (a broken or hostile backend) must not become the answer to the
    next request sent on it, which may be another client's: that connection is closed instead."""
    backend = RawBackend(lambda _index: "stray")
    proxy = await proxy_to(start_server, backends, backend)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert await chat(proxy, session) == (200, ANSWER)
            await asyncio.sleep(0.3)  # the stray answer has arrived
    assert backend.opened == 3


async def test_an_answer_that_is_not_http_is_a_502_and_fails_over(
    start_server: ServerFactory, backends: list[RawBackend], tmp_path: Path
) -> None:
    """A head that does not parse is a failed attempt, like an unreachable backend: the next backend answers,
    and with none left the client gets a 502 in OpenAI's shape, not an error of azproxy's own."""
    broken, good = RawBackend(lambda _index: "garbage"), RawBackend(lambda _index: "answer")
    for backend in (broken, good):
        backends.append(backend)
        await backend.start()
    config = tmp_path / "backends.toml"
    config.write_text(
        "".join(
            f'[[backend]]\nname = "{name}"\nendpoint = "http://127.0.0.1:{backend.port}"\npriority = {priority}\n'
            for name, backend, priority in (("broken", broken, 0), ("good", good, 1))
        )
    )
    settings = load_settings({"AZPROXY_CONFIG": str(config), "AZURE_OPENAI_TOKEN": AZURE_KEY})
    proxy = Proxy(await start_server(build_app(settings)))
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url / "v1/chat/completions", json=CHAT, headers=HEADERS) as response,
    ):
        assert (response.status, await response.read()) == (200, ANSWER)
        assert response.headers["x-azproxy-backend"] == "good"
    alone = await proxy_to(start_server, backends, RawBackend(lambda _index: "garbage"))
    async with aiohttp.ClientSession() as session:
        status, body = await chat(alone, session)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_unreachable"


async def test_closing_the_pool_closes_connections_still_in_use(backends: list[RawBackend]) -> None:
    """The pool closes once no request uses it (a reload's old pool, or after the drain): an answer still
    holding a connection then belongs to nobody, and its connection must not stay open."""
    backend = RawBackend(lambda _index: "answer")
    backends.append(backend)
    port = await backend.start()
    pool = Connections(Resolver().for_connector(False))
    answer = await pool.request(
        "POST",
        URL(f"http://127.0.0.1:{port}/x"),
        CIMultiDict(),
        b"{}",
        connect_timeout=5,
        first_byte_timeout=5,
    )
    assert answer.status == 200
    await pool.close()
    async with asyncio.timeout(5):
        await backend.wait_closed(1)


class TwoAddresses(AbstractResolver):
    """A host with two addresses: the first refuses connections, the second is the backend."""

    def __init__(self, refused: int, port: int) -> None:
        self._ports = (refused, port)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host="127.0.0.1", port=p, family=socket.AF_INET, proto=0, flags=0)
            for p in self._ports
        ]

    async def close(self) -> None:
        return None


async def test_the_next_address_is_tried_when_one_refuses(
    backends: list[RawBackend], closed_port: int
) -> None:
    backend = RawBackend(lambda _index: "answer")
    backends.append(backend)
    port = await backend.start()
    pool = Connections(TwoAddresses(closed_port, port))
    answer = await pool.request(
        "POST",
        URL("http://backend.test:8443/x"),
        CIMultiDict(),
        b"{}",
        connect_timeout=5,
        first_byte_timeout=5,
    )
    assert answer.status == 200
    assert await answer.content.read() == ANSWER
    answer.release()
    await pool.close()
    assert b"Host: backend.test:8443\r\n" in backend.heads[0]


def test_a_header_with_a_line_break_is_never_written() -> None:
    url = URL("http://backend.test/openai/x")
    for name, value in (("x-a", "b\r\nx-injected: 1"), ("x-a", "b\nc"), ("x-a\r", "b"), ("x-a", "b\rc")):
        with pytest.raises(ValueError, match="line break"):
            _head("POST", url, CIMultiDict({name: value}), b"{}")
    head = _head("GET", URL("https://backend.test:443/p?q=1"), CIMultiDict({"x-a": "b"}), b"")
    assert head == b"GET /p?q=1 HTTP/1.1\r\nHost: backend.test\r\nx-a: b\r\n\r\n"


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_https_backend_is_verified_against_the_trust_store(
    start_server: ServerFactory,
    backends: list[RawBackend],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool,
) -> None:
    """The backend's name is mapped to a loopback listener (no DNS, nothing leaves the machine); its
    certificate is good only when the trust store (SSL_CERT_FILE here) has the CA that signed it."""
    host = "resource.openai.azure.com"
    authority = CertificateAuthority(tmp_path, [host])
    context, ca_path = server_context_for(authority, host, tmp_path), authority.cert_path
    if trusted:
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))
    backend = RawBackend(lambda _index: "answer", tls=context)
    port = await backend.start()
    resolver = Resolver({(host, 443): ("127.0.0.1", port)})
    proxy = await proxy_to(start_server, backends, backend, f"https://{host}", resolver)
    async with aiohttp.ClientSession() as session:
        status, body = await chat(proxy, session)
    if trusted:
        assert (status, body) == (200, ANSWER)
        assert b"Host: resource.openai.azure.com\r\n" in backend.heads[0]
    else:
        assert status == 502
        assert json.loads(body)["error"]["code"] == "upstream_unreachable"
        assert backend.heads == []
