"""Several backends behind one endpoint: emulators on their own loopback ports as Azure resources, azproxy in
front of them from a config file, and the router's clock moved by hand instead of sleeping."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from azproxy.backends import backends_from
from azproxy.config import ConfigError, Secret, load_settings
from azproxy.credentials import ApiKey
from azproxy.emulator import DEFAULT_DEPLOYMENTS, Deployment, Emulator
from azproxy.emulator.app import CannedFailure
from azproxy.readiness import readyz
from azproxy.routing import Router
from azproxy.server import build_app
from azproxy.state import STATE

from .conftest import AZURE_KEY, SECRETS, Proxy, ServerFactory, free_port

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
HEADERS = {"Authorization": f"Bearer {AZURE_KEY}"}
EAST_KEY = "east-resource-key-for-tests"
SECRETS.add(EAST_KEY)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """Emulators by backend name, and azproxy in front of them."""

    def __init__(self, start_server: ServerFactory, tmp_path: Path) -> None:
        self._start_server = start_server
        self._tmp_path = tmp_path
        self.emulators: dict[str, Emulator] = {}
        self.clock = FakeClock()
        self.proxy: Proxy | None = None
        self.app: web.Application | None = None

    async def emulator(self, name: str, deployments: Iterable[Deployment] = DEFAULT_DEPLOYMENTS) -> str:
        emulator = Emulator(api_keys={AZURE_KEY, EAST_KEY}, deployments=deployments)
        self.emulators[name] = emulator
        server = await self._start_server(emulator.app())
        return str(server.make_url("")).rstrip("/")

    async def start(self, config: str, **environment: str) -> Proxy:
        path = self._tmp_path / "azproxy.toml"
        path.write_text(config)
        source = {"AZPROXY_CONFIG": str(path), "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080"} | environment
        settings = load_settings(source)
        self.app = build_app(settings)
        upstream = self.app[STATE].upstream
        # What serve does with settings.failover, here on a clock the tests move.
        upstream.router = Router(upstream.backends, settings.failover, clock=self.clock)
        self.proxy = Proxy(await self._start_server(self.app))
        return self.proxy

    @property
    def router(self) -> Router:
        assert self.app is not None
        return self.app[STATE].upstream.router

    def calls(self) -> dict[str, int]:
        return {name: len(emulator.received) for name, emulator in self.emulators.items()}

    async def post(
        self, path: str = "/v1/chat/completions", body: Any = CHAT, headers: dict[str, str] | None = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        assert self.proxy is not None
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                self.proxy.url.with_path(path), json=body, headers=HEADERS | (headers or {})
            ) as answer,
        ):
            return answer.status, CIMultiDict(answer.headers), await answer.read()

    async def get(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, CIMultiDict[str], bytes]:
        assert self.proxy is not None
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.proxy.url.with_path(path), headers=HEADERS | (headers or {})) as answer,
        ):
            return answer.status, CIMultiDict(answer.headers), await answer.read()


@pytest.fixture
def fleet(start_server: ServerFactory, tmp_path: Path) -> Fleet:
    return Fleet(start_server, tmp_path)


def backend(name: str, url: str, **keys: Any) -> str:
    lines = [f'name = "{name}"', f'endpoint = "{url}"'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "[[backend]]\n" + "\n".join(lines) + "\n"


async def two(fleet: Fleet, east: dict[str, Any] | None = None, **environment: str) -> Proxy:
    config = backend("east", await fleet.emulator("east"), **(east or {}))
    config += backend("west", await fleet.emulator("west"))
    return await fleet.start(config, **environment)


async def test_weights_three_to_one_give_30_and_10_of_40(fleet: Fleet) -> None:
    await two(fleet, {"weight": 3})
    served = Counter()
    for _ in range(40):
        status, headers, _ = await fleet.post()
        assert status == 200
        assert headers["x-azproxy-attempts"] == "1"
        served[headers["x-azproxy-backend"]] += 1
    assert served == {"east": 30, "west": 10}
    assert fleet.calls() == {"east": 30, "west": 10}


async def test_a_429_moves_traffic_away_for_its_retry_after_and_back(fleet: Fleet) -> None:
    await two(fleet)
    fleet.emulators["east"].fail_next(429, retry_after=2)
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-backend"], headers["x-azproxy-attempts"]) == (200, "west", "2")
    for _ in range(4):
        assert (await fleet.post())[1]["x-azproxy-backend"] == "west"
    assert fleet.calls() == {"east": 1, "west": 5}
    assert fleet.emulators["east"].received[0].body == fleet.emulators["west"].received[0].body
    fleet.clock.now += 2.01
    served = {(await fleet.post())[1]["x-azproxy-backend"] for _ in range(4)}
    assert served == {"east", "west"}


async def test_retry_after_ms_is_honoured_over_retry_after(fleet: Fleet) -> None:
    await two(fleet)
    fleet.emulators["east"].failures.append(
        CannedFailure(
            429,
            {"error": {"code": "429", "message": "slow down"}},
            {"retry-after-ms": "500", "retry-after": "30"},
        )
    )
    assert (await fleet.post())[1]["x-azproxy-backend"] == "west"
    fleet.clock.now += 0.4
    assert {(await fleet.post())[1]["x-azproxy-backend"] for _ in range(3)} == {"west"}
    fleet.clock.now += 0.11
    assert "east" in {(await fleet.post())[1]["x-azproxy-backend"] for _ in range(2)}


async def test_all_cooling_is_429_with_the_shortest_retry_after_and_no_call(fleet: Fleet) -> None:
    await two(fleet)
    fleet.emulators["east"].fail_next(429, retry_after=5)
    fleet.emulators["west"].fail_next(429, retry_after=3)
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-attempts"]) == (429, "2")  # the last backend's own answer
    assert headers["retry-after"] == {"east": "5", "west": "3"}[headers["x-azproxy-backend"]]
    before = fleet.calls()
    fleet.clock.now += 0.5
    status, headers, body = await fleet.post()
    assert status == 429
    assert headers["retry-after"] == "3"  # 2.5 s left, rounded up
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert fleet.calls() == before


async def test_refused_connections_are_skipped_and_the_circuit_opens_then_closes_on_a_probe(
    fleet: Fleet, aiohttp_server: Callable[..., Awaitable[TestServer]], caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    config = backend("east", f"http://127.0.0.1:{port}", api_key="env:EAST_KEY")
    config += backend("west", await fleet.emulator("west"))
    await fleet.start(config, EAST_KEY=EAST_KEY)
    attempts = []
    for _ in range(8):
        status, headers, _ = await fleet.post()
        assert (status, headers["x-azproxy-backend"]) == (200, "west")
        attempts.append(headers["x-azproxy-attempts"])
    assert attempts.count("2") == 3  # east tried three times, then its circuit opened
    assert attempts[-2:] == ["1", "1"]
    assert any(
        "east (127.0.0.1)" in r.getMessage() and "circuit open" in r.getMessage() for r in caplog.records
    )

    east = Emulator(api_keys={EAST_KEY})
    await aiohttp_server(east.app(), port=port)
    fleet.clock.now += 30
    served = [(await fleet.post())[1]["x-azproxy-backend"] for _ in range(4)]
    assert served.count("east") == 2  # the probe succeeded: east is back in the rotation
    assert east.received[0].headers["api-key"] == EAST_KEY


async def test_400_and_404_are_returned_not_retried(fleet: Fleet) -> None:
    await two(fleet)
    filtered = {**CHAT, "messages": [{"role": "user", "content": "__content_filter__"}]}
    status, headers, body = await fleet.post(body=filtered)
    assert (status, headers["x-azproxy-attempts"]) == (400, "1")
    assert json.loads(body)["error"]["code"] == "content_filter"
    status, headers, body = await fleet.post(body={**CHAT, "model": "no-such-deployment"})
    assert (status, headers["x-azproxy-attempts"]) == (404, "1")
    assert sum(fleet.calls().values()) == 2


async def test_5xx_fails_over_and_the_last_answer_reaches_the_client(fleet: Fleet) -> None:
    await two(fleet, AZPROXY_MAX_ATTEMPTS="1")
    fleet.emulators["east"].fail_next(503)
    fleet.emulators["west"].fail_next(503)
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-attempts"]) == (503, "1")
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-attempts"]) == (503, "1")


async def test_a_stream_cut_by_its_backend_reaches_the_client_cut(
    fleet: Fleet, start_server: ServerFactory
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n')
        assert request.transport is not None
        request.transport.close()
        return response

    broken = web.Application()
    broken.router.add_post("/{tail:.*}", cut)
    server = await start_server(broken)
    config = backend("east", str(server.make_url("")).rstrip("/"))
    config += backend("west", await fleet.emulator("west"), priority=1)
    await fleet.start(config)
    status, headers, body = await fleet.post(body={**CHAT, "stream": True})
    assert (status, headers["x-azproxy-backend"]) == (200, "east")
    assert b'"Hel"' in body
    assert b"[DONE]" not in body
    assert b"upstream_stream_broken" in body
    assert fleet.calls() == {"west": 0}


async def test_priority_one_serves_only_while_every_priority_zero_backend_is_out(fleet: Fleet) -> None:
    config = backend("east", await fleet.emulator("east"))
    config += backend("west", await fleet.emulator("west"))
    config += backend("spare", await fleet.emulator("spare"), priority=1)
    await fleet.start(config)
    for _ in range(6):
        assert (await fleet.post())[1]["x-azproxy-backend"] != "spare"
    fleet.emulators["east"].fail_next(429, retry_after=4)
    fleet.emulators["west"].fail_next(429, retry_after=4)
    for _ in range(2):  # one request finds the first throttled, the next the other
        await fleet.post()
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-backend"], headers["x-azproxy-attempts"]) == (200, "spare", "1")
    fleet.clock.now += 4
    assert {(await fleet.post())[1]["x-azproxy-backend"] for _ in range(4)} == {"east", "west"}


async def test_resource_requests_stay_on_the_primary_and_are_never_failed_over(fleet: Fleet) -> None:
    await two(fleet)
    fleet.emulators["east"].fail_next(500)
    status, headers, _ = await fleet.get("/v1/files")
    assert (status, headers["x-azproxy-backend"], headers["x-azproxy-attempts"]) == (500, "east", "1")
    assert fleet.calls() == {"east": 1, "west": 0}
    status, headers, _ = await fleet.get("/v1/files", {"x-azproxy-backend": "west"})
    assert (status, headers["x-azproxy-backend"]) == (200, "west")
    assert "x-azproxy-backend" not in fleet.emulators["west"].last.headers
    status, _, body = await fleet.get("/v1/files", {"x-azproxy-backend": "north"})
    assert status == 400
    assert json.loads(body)["error"]["code"] == "unknown_backend"


async def test_a_client_leaving_during_a_slow_first_attempt_closes_it_and_starts_no_other(
    fleet: Fleet, start_server: ServerFactory
) -> None:
    arrived, closed = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        arrived.set()
        try:
            await asyncio.sleep(60)
        finally:
            closed.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/{tail:.*}", slow)
    server = await start_server(app)
    config = backend("east", str(server.make_url("")).rstrip("/"))
    config += backend("west", await fleet.emulator("west"), priority=1)
    await fleet.start(config)
    request = asyncio.create_task(fleet.post())
    await asyncio.wait_for(arrived.wait(), 5)
    request.cancel()
    await asyncio.wait_for(closed.wait(), 5)
    await asyncio.sleep(0.1)
    assert fleet.calls() == {"west": 0}


async def test_a_slow_first_byte_fails_over_and_a_steady_stream_is_never_cut(
    fleet: Fleet, start_server: ServerFactory
) -> None:
    async def slow(_request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_post("/{tail:.*}", slow)
    server = await start_server(app)
    config = backend("east", str(server.make_url("")).rstrip("/"), first_byte_timeout=0.3)
    config += backend(
        "west", await fleet.emulator("west"), first_byte_timeout=0.5, idle_timeout=0.5, priority=1
    )
    await fleet.start(config)
    steady = {"x-emulator-delay": "0.2", "x-emulator-chunks": "6"}  # 1.2 s in all, 0.2 s between chunks
    status, headers, body = await fleet.post(body={**CHAT, "stream": True}, headers=steady)
    assert (status, headers["x-azproxy-backend"], headers["x-azproxy-attempts"]) == (200, "west", "2")
    assert body.rstrip().endswith(b"data: [DONE]")
    assert b"error" not in body


async def test_backend_headers_can_be_turned_off(fleet: Fleet) -> None:
    await two(fleet, AZPROXY_BACKEND_HEADERS="false")
    status, headers, _ = await fleet.post()
    assert status == 200
    assert "x-azproxy-backend" not in headers
    assert "x-azproxy-attempts" not in headers


async def test_models_table_limits_a_model_to_its_backends(fleet: Fleet) -> None:
    config = backend("east", await fleet.emulator("east"))
    config += backend("west", await fleet.emulator("west"))
    config += '[[model]]\nname = "house-chat"\ndeployments = { west = "gpt-4o" }\n'
    await fleet.start(config)
    for _ in range(3):
        status, headers, _ = await fleet.post(body={**CHAT, "model": "house-chat"})
        assert (status, headers["x-azproxy-backend"]) == (200, "west")
    assert fleet.emulators["west"].last.path == "/openai/deployments/gpt-4o/chat/completions"
    status, _, body = await fleet.get("/v1/models")
    assert status == 200
    assert "house-chat" in {model["id"] for model in json.loads(body)["data"]}


async def test_readyz_is_503_while_every_backend_is_out(fleet: Fleet, start_server: ServerFactory) -> None:
    await two(fleet)
    app = web.Application()
    assert fleet.app is not None
    app[STATE] = fleet.app[STATE]
    app.router.add_get("/readyz", readyz)
    server = await start_server(app)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/readyz")) as answer:
            assert answer.status == 200
        for name in ("east", "west"):
            fleet.emulators[name].fail_next(429, retry_after=5)
        await fleet.post()
        async with session.get(server.make_url("/readyz")) as answer:
            assert answer.status == 503
        fleet.clock.now += 5
        async with session.get(server.make_url("/readyz")) as answer:
            assert answer.status == 200


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\nwieght = 2\n',
            "[[backend]] 'east': wieght: unknown key (known for kind = 'azure': ",
        ),
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\n'
            '[[model]]\nname = "gpt-4o"\ndeployments = { east = "a", sweden = "b" }\n',
            "[[model]] 'gpt-4o': deployments: no [[backend]] is named 'sweden' (known: east)",
        ),
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\napi_key = "env:NOT_SET_ANYWHERE"\n',
            "[[backend]] 'east': api_key: environment variable 'NOT_SET_ANYWHERE' is not set",
        ),
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\nweight = 0\n',
            "[[backend]] 'east': weight: must be a positive integer, not 0",
        ),
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\nweight = 1.5\n',
            "[[backend]] 'east': weight: must be a positive integer, not 1.5",
        ),
        (
            '[[backend]]\nname = "east"\nendpoint = "https://e.example"\napi_key = "0123456789abcdef"\n',
            "[[backend]] 'east': api_key: give env:NAME or file:/path here",
        ),
        ('[[backend]]\nname = "east west"\n', "[[backend]] 'east west': name: required: letters, digits"),
        ('[[backend]]\nendpoint = "https://e.example"\n', "[[backend]] #1: name: required"),
        ('[[backend]]\nname = "east"\n', "[[backend]] 'east': endpoint: required"),
        (
            '[[backend]]\nname = "a"\nendpoint = "https://e.example"\n'
            '[[backend]]\nname = "a"\nendpoint = "https://f.example"\n',
            "[[backend]] name: names must be unique; repeated: ['a']",
        ),
    ],
)
def test_config_file_backend_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "azproxy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings({"AZPROXY_CONFIG": str(path)})
    error = str(caught.value)
    assert "\n" not in error
    assert error.startswith(f"{path}: ")
    assert message in error
    assert "0123456789abcdef" not in error


def test_file_backends_replace_the_endpoint_and_take_the_global_defaults(tmp_path: Path) -> None:
    path = tmp_path / "azproxy.toml"
    path.write_text(
        '[azure]\napi_version = "2025-04-01-preview"\n'
        + backend("east", "https://e.example", api_key="env:EAST_KEY", weight=2)
        + backend("openai", "https://api.openai.com", priority=1)
        .replace("endpoint", "base_url")
        .replace('name = "openai"', 'name = "openai"\nkind = "openai"')
    )
    settings = load_settings({"AZPROXY_CONFIG": str(path), "EAST_KEY": EAST_KEY})
    east, openai = settings.backends
    assert (east.name, east.weight, east.priority, east.has_credential) == ("east", 2, 0, True)
    assert (openai.kind, str(openai.url), openai.priority) == ("openai", "https://api.openai.com", 1)
    assert not settings.has_server_credential  # openai forwards the client's key


def test_entra_backends_sign_in_and_key_backends_send_their_key(tmp_path: Path) -> None:
    path = tmp_path / "azproxy.toml"
    path.write_text(
        backend("east", "https://e.example", api_key="env:EAST_KEY")
        + backend("sweden", "https://s.example", auth="entra")
        + backend("west", "https://w.example")
    )
    settings = load_settings({"AZPROXY_CONFIG": str(path), "EAST_KEY": EAST_KEY})
    signed_in = ApiKey(Secret("token-standing-in-for-entra"))
    east, sweden, west = backends_from(settings, signed_in)
    assert isinstance(east.credential, ApiKey)
    assert east.credential is not signed_in
    assert sweden.credential is signed_in
    assert west.credential is None  # the client's key is forwarded
    assert not settings.has_server_credential


async def test_models_lists_what_every_backend_reports(fleet: Fleet) -> None:
    config = backend("east", await fleet.emulator("east", [Deployment("east-only", "gpt-4o")]))
    config += backend("west", await fleet.emulator("west", [Deployment("west-only", "gpt-4o-mini")]))
    await fleet.start(config)
    status, _, body = await fleet.get("/v1/models")
    assert status == 200
    assert {"east-only", "west-only"} <= {model["id"] for model in json.loads(body)["data"]}


async def test_realtime_goes_where_routing_sends_it(fleet: Fleet) -> None:
    config = backend("east", await fleet.emulator("east"))
    config += backend("west", await fleet.emulator("west"))
    config += '[[model]]\nname = "voice"\ndeployments = { west = "gpt-4o-realtime-preview" }\n'
    proxy = await fleet.start(config)
    url = (proxy.url / "v1/realtime").with_query(model="voice")
    async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=HEADERS) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
    assert fleet.calls()["east"] == 0
    assert fleet.emulators["west"].last.query["deployment"] == "gpt-4o-realtime-preview"


async def test_a_failover_is_one_access_log_line_and_counted(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    await two(fleet)
    fleet.emulators["east"].fail_next(429, retry_after=2)
    status, headers, _ = await fleet.post()
    assert (status, headers["x-azproxy-attempts"]) == (200, "2")
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "azproxy.access"]
    assert (line["backend"], line["attempts"], line["status"], line["model"]) == ("west", 2, 200, "gpt-4o")
    assert line["request_id"] == headers["x-azproxy-request-id"]
    status, _, metrics = await fleet.get("/metrics")
    text = metrics.decode()
    assert 'azproxy_failovers_total{model="gpt-4o"} 1.0' in text
    assert 'azproxy_upstream_attempts_total{backend="east",outcome="429"} 1.0' in text
    assert 'azproxy_upstream_attempts_total{backend="west",outcome="ok"} 1.0' in text
