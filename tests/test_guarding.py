"""Holes an attack report found: IPv4 hidden in IPv6, keys in logged URLs and config errors, unthrottled key
guessing, short keys and an open tunnel allowlist."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
from pathlib import Path

import aiohttp
import httpx
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import azproxy.access
from azproxy.access import Admission
from azproxy.addresses import is_public
from azproxy.config import ConfigError, load_settings
from azproxy.edge.arrival import REVERSE, Arrival, ArrivalKind, Passage
from azproxy.errors import ProxyAuthRequired, Unauthorized
from azproxy.guessing import BLOCK_SECONDS, GuessingGuard, TooManyAuthFailures
from azproxy.ratelimit import MemoryCounters, RateLimiter

from .conftest import AZURE_KEY, SECRETS, ProxyFactory

GOOD_KEY = "sk-guarding-client-key-0001"
WRONG_KEY = "sk-guarding-wrong-key-0002"
QUERY_KEY = "query-key-for-guarding-0003"
URL_PASSWORD = "url-password-for-guarding-0004"
PROXY_PASSWORD = "guarding-proxy-pass-0005"
SECRETS.update({GOOD_KEY, WRONG_KEY, QUERY_KEY, URL_PASSWORD, PROXY_PASSWORD})
BASE = {"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com", "AZURE_OPENAI_TOKEN": AZURE_KEY}


# 1. IPv4 addresses carried in IPv6 are judged as those IPv4 addresses.


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
        "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
        "::ffff:0:a00:1",  # IPv4-translated 10.0.0.1
        "::ffff:127.0.0.1",  # IPv4-mapped
        "::ffff:192.168.1.1",
        "64:ff9b::7f00:1",  # NAT64 well-known prefix
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::6440:1",  # 100.64.0.1, shared address space
        "64:ff9b:1::7f00:1",  # NAT64 local-use prefix
        "64:ff9b:1:7f00:1::808:808",  # local use, /48 layout: the IPv4 address sits where no one can tell
        "::1",
        "::",
    ],
)
def test_ipv4_in_ipv6_is_not_public_when_the_ipv4_is_not(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize("address", ["::808:808", "::ffff:0:808:808", "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_ipv4_in_ipv6_is_public_when_the_ipv4_is(address: str) -> None:
    assert is_public(address)


# 2. Keys and passwords in URLs reach no log and no error message.


async def test_access_log_writes_the_path_without_the_query(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(AZPROXY_LOG_FORMAT="text")
    port = proxy.server.port
    assert port is not None
    with caplog.at_level(logging.INFO, logger="azproxy.access"):
        async with (
            aiohttp.ClientSession() as client,  # httpx would log the URL itself
            client.get(
                proxy.url.with_path("/v1/models").with_query({"api-key": QUERY_KEY}),
                headers={"Referer": f"https://ui.example/?key={QUERY_KEY}", "User-Agent": "guarding-test"},
            ) as reply,
        ):
            assert reply.status == 200
        for head_text in (  # a forward-proxy request and a CONNECT, as a client writes them
            f"GET http://user:{QUERY_KEY}@api.example/v1/models?key={QUERY_KEY} HTTP/1.1\r\nHost: api.example",
            "CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{head_text}\r\nConnection: close\r\n\r\n".encode())
            await reader.read()
            writer.close()
    lines = [record.getMessage() for record in caplog.records if record.name == "azproxy.access"]
    assert len(lines) == 3
    assert lines[0].startswith("GET /v1/models 200 ")
    assert lines[1].startswith("GET api.example:80 403 ")  # the refused target, by host and port only
    assert lines[2].startswith("CONNECT [::1]:443 403 ")
    for line in lines:
        assert QUERY_KEY not in line
        assert "?" not in line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AZURE_OPENAI_ENDPOINT", f"https://user:{URL_PASSWORD}@res.openai.azure.com"),
        ("AZURE_OPENAI_ENDPOINT", f"https://user:{URL_PASSWORD}/x@res.openai.azure.com"),
        ("AZURE_OPENAI_ENDPOINT", f"https://res.openai.azure.com/?api-key={URL_PASSWORD}"),
        ("AZURE_OPENAI_ENDPOINT", f"ftp://user:{URL_PASSWORD}@res.openai.azure.com"),
        ("AZURE_OPENAI_ENDPOINT", f"https://user:{URL_PASSWORD}@[::1"),
        ("AZPROXY_OPENAI_BASE_URL", f"https://user:{URL_PASSWORD}@api.openai.com/v1"),
        ("AZPROXY_CORS_ORIGINS", f"https://user:{URL_PASSWORD}@chat.example.com"),
        ("AZPROXY_TUNNEL_ALLOW", f"user:{URL_PASSWORD}@host.example"),
        ("AZPROXY_INTERCEPT_HOSTS", f"https://user:{URL_PASSWORD}@api.openai.com"),
        ("AZPROXY_ALLOWED_HOSTS", f"user:{URL_PASSWORD}@proxy.example"),
        ("AZURE_OPENAI_PROXY_ADDRESS", f"http://user:{URL_PASSWORD}@0.0.0.0:x"),
    ],
)
def test_config_errors_never_echo_a_urls_credentials(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(BASE | {"AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080", variable: value})
    message = str(refused.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message
    assert URL_PASSWORD not in message
    assert "user:" not in message


# 3. Key guessing is throttled per client address.


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def admission(clock: FakeClock, **environment: str) -> Admission:
    settings = load_settings(
        BASE | {"AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080", "AZPROXY_API_KEYS": GOOD_KEY} | environment
    )
    return Admission(settings, RateLimiter(MemoryCounters()), clock=clock)


def head(key: str | None = None, **extra: str) -> CIMultiDictProxy[str]:
    headers = CIMultiDict(extra)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return CIMultiDictProxy(headers)


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every key Admission compares against the client keys."""
    keys: list[str] = []
    real = azproxy.access.find_client

    def counting(clients: object, key: str) -> object:
        keys.append(key)
        return real(clients, key)  # type: ignore[arg-type]

    monkeypatch.setattr(azproxy.access, "find_client", counting)
    return keys


def test_an_address_that_guesses_too_often_gets_429_without_any_key_compared(
    compared: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    gate = admission(clock, AZPROXY_AUTH_FAILURE_LIMIT="3")
    for _ in range(3):
        with pytest.raises(Unauthorized):
            gate.identify(REVERSE, head(WRONG_KEY), "203.0.113.7")
    assert gate.identify(REVERSE, head(GOOD_KEY), "203.0.113.8") is not None  # others are not blocked
    compared.clear()
    for offered in (WRONG_KEY, GOOD_KEY, WRONG_KEY):
        clock.now += 10
        with pytest.raises(TooManyAuthFailures) as blocked:
            gate.identify(REVERSE, head(offered), "203.0.113.7")
    assert compared == []
    answer = blocked.value.to_response()
    assert answer.status == 429
    assert answer.headers["retry-after"] == str(int(BLOCK_SECONDS) - 30)
    assert blocked.value.code == "too_many_auth_failures"
    assert sum("203.0.113.7" in record.getMessage() for record in caplog.records) == 1  # once per block
    clock.now += BLOCK_SECONDS - 30
    assert gate.identify(REVERSE, head(GOOD_KEY), "203.0.113.7") is not None
    assert compared == [GOOD_KEY]


def test_failures_count_within_a_minute_and_missing_keys_are_no_guesses() -> None:
    clock = FakeClock()
    gate = admission(clock, AZPROXY_AUTH_FAILURE_LIMIT="2")
    for _ in range(5):
        with pytest.raises(Unauthorized):
            gate.identify(REVERSE, head(), "203.0.113.7")
        clock.now += 61  # each failure falls out of the window before the next one
        with pytest.raises(Unauthorized):
            gate.identify(REVERSE, head(WRONG_KEY), "203.0.113.7")
    with pytest.raises(Unauthorized):
        gate.identify(REVERSE, head(WRONG_KEY), "203.0.113.7")
    with pytest.raises(TooManyAuthFailures):
        gate.identify(REVERSE, head(GOOD_KEY), "203.0.113.7")


def test_limit_zero_turns_the_guard_off() -> None:
    gate = admission(FakeClock(), AZPROXY_AUTH_FAILURE_LIMIT="0")
    for _ in range(50):
        with pytest.raises(Unauthorized):
            gate.identify(REVERSE, head(WRONG_KEY), "203.0.113.7")
    assert gate.identify(REVERSE, head(GOOD_KEY), "203.0.113.7") is not None


def test_proxy_password_guesses_count_too() -> None:
    gate = admission(FakeClock(), AZPROXY_AUTH_FAILURE_LIMIT="2", AZPROXY_PROXY_AUTH=f"user:{PROXY_PASSWORD}")
    connect = Arrival(ArrivalKind.CONNECT, Passage.TRANSLATE)
    wrong = "Basic " + base64.b64encode(b"user:wrong-guess").decode()
    for _ in range(2):
        with pytest.raises(ProxyAuthRequired):
            gate.identify(connect, head(**{"Proxy-Authorization": wrong}), "203.0.113.7")
    right = "Basic " + base64.b64encode(f"user:{PROXY_PASSWORD}".encode()).decode()
    with pytest.raises(TooManyAuthFailures):
        gate.identify(connect, head(GOOD_KEY, **{"Proxy-Authorization": right}), "203.0.113.7")


def test_behind_a_trusted_proxy_the_client_is_the_last_untrusted_forwarded_address() -> None:
    clock = FakeClock()
    gate = admission(clock, AZPROXY_AUTH_FAILURE_LIMIT="2", AZPROXY_TRUSTED_PROXIES="10.0.0.0/8")
    forged = ("198.51.100.1", "198.51.100.2")  # whatever the guesser writes first changes nothing
    for first in forged:
        with pytest.raises(Unauthorized):
            gate.identify(
                REVERSE, head(WRONG_KEY, **{"X-Forwarded-For": f"{first}, 203.0.113.7, 10.0.0.2"}), "10.0.0.1"
            )
    with pytest.raises(TooManyAuthFailures):
        gate.identify(REVERSE, head(GOOD_KEY, **{"X-Forwarded-For": "203.0.113.7"}), "10.0.0.3")
    for other in ("203.0.113.8", "10.0.0.1, 10.0.0.2"):  # another client; a proxy's own request
        assert gate.identify(REVERSE, head(GOOD_KEY, **{"X-Forwarded-For": other}), "10.0.0.1") is not None
    # An untrusted peer is the client, whatever it writes in X-Forwarded-For.
    for _ in range(2):
        with pytest.raises(Unauthorized):
            gate.identify(REVERSE, head(WRONG_KEY, **{"X-Forwarded-For": "192.0.2.1"}), "198.51.100.9")
    with pytest.raises(TooManyAuthFailures):
        gate.identify(REVERSE, head(GOOD_KEY), "198.51.100.9")
    assert gate.identify(REVERSE, head(GOOD_KEY, **{"X-Forwarded-For": "192.0.2.1"}), "10.0.0.1") is not None


def test_ipv6_clients_count_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    guard = GuessingGuard(2, clock=FakeClock())
    guard.failed("2001:db8:1:2::1")
    guard.failed("2001:db8:1:2:ffff::9")
    with pytest.raises(TooManyAuthFailures):
        guard.check("2001:db8:1:2::77")
    guard.check("2001:db8:1:3::1")
    guard.failed("::ffff:203.0.113.7")
    guard.failed("203.0.113.7")
    with pytest.raises(TooManyAuthFailures):
        guard.check("203.0.113.7")


def test_tracked_addresses_are_capped_dropping_the_oldest() -> None:
    guard = GuessingGuard(1, clock=FakeClock(), max_addresses=3)
    guard.failed("192.0.2.1")
    guard.failed("192.0.2.2")
    guard.failed("192.0.2.3")
    guard.failed("192.0.2.4")
    guard.check("192.0.2.1")  # dropped: no longer blocked
    for kept in ("192.0.2.2", "192.0.2.3", "192.0.2.4"):
        with pytest.raises(TooManyAuthFailures):
            guard.check(kept)
    trusted = GuessingGuard(1, (ipaddress.ip_network("::/0"),))
    assert trusted.client_address("::1", head(**{"X-Forwarded-For": "not-an-address"})) == "::1"


async def test_guessing_through_the_proxy_is_answered_429(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=GOOD_KEY)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=str(proxy.url)) as client:
        for _ in range(5):  # the default AZPROXY_AUTH_FAILURE_LIMIT
            reply = await client.post("/v1/chat/completions", json=chat, headers={"api-key": WRONG_KEY})
            assert reply.status_code == 401
        for key in (WRONG_KEY, GOOD_KEY):
            reply = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 429
            assert int(reply.headers["retry-after"]) == BLOCK_SECONDS
            assert reply.json()["error"]["code"] == "too_many_auth_failures"


# 4. Start-up refuses short keys and an unguarded tunnel allowlist.


def test_short_client_keys_are_refused(tmp_path: Path) -> None:
    short = "sk-15-chars-key"
    (tmp_path / "short.key").write_text(short + "\n")
    sources = {
        "AZPROXY_API_KEYS": {"AZPROXY_API_KEYS": f"{GOOD_KEY},{short}"},
        "env:": {"AZPROXY_CLIENTS_FILE": "env", "SHORT": short},
        "file:": {"AZPROXY_CLIENTS_FILE": "file"},
    }
    for where, environment in sources.items():
        if "AZPROXY_CLIENTS_FILE" in environment:
            path = tmp_path / "clients.toml"
            key = "env:SHORT" if where == "env:" else "file:short.key"
            path.write_text(f'[[client]]\nname = "short"\nkey = "{key}"\n')
            environment = environment | {"AZPROXY_CLIENTS_FILE": str(path)}
        with pytest.raises(ConfigError, match="shorter than 16 characters") as refused:
            load_settings(BASE | environment)
        message = str(refused.value)
        assert message.startswith(next(iter(environment)) + ":")
        assert "\n" not in message
        assert short not in message
    digest_only = tmp_path / "digest.toml"
    digest_only.write_text(f'[[client]]\nname = "d"\nkey = "sha256:{"ab" * 32}"\n')
    assert load_settings(BASE | {"AZPROXY_CLIENTS_FILE": str(digest_only)}).access.clients
    assert load_settings(BASE | {"AZPROXY_API_KEYS": "sixteen-chars-ok"}).access.clients


def test_a_reachable_tunnel_allowlist_needs_credentials() -> None:
    reachable = {
        "AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com",
        "AZURE_OPENAI_PROXY_ADDRESS": "0.0.0.0:8080",
        "AZPROXY_TUNNEL_ALLOW": "internal.example",
    }
    for address in ("0.0.0.0:8080", "[::]:8080", "192.0.2.1:8080"):
        with pytest.raises(ConfigError, match=r"^AZPROXY_TUNNEL_ALLOW .*AZPROXY_ALLOW_ANONYMOUS=true$"):
            load_settings(reachable | {"AZURE_OPENAI_PROXY_ADDRESS": address})
    for guarded in (
        {"AZPROXY_PROXY_AUTH": f"user:{PROXY_PASSWORD}"},
        {"AZPROXY_API_KEYS": GOOD_KEY, "AZURE_OPENAI_TOKEN": AZURE_KEY},
        {"AZPROXY_ALLOW_ANONYMOUS": "true"},
        {"AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080"},
    ):
        assert load_settings(reachable | guarded).forward.tunnel_allow
