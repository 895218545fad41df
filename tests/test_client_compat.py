"""What clients still trip over on Azure, each against the emulator: reasoning models' parameters, Responses and
realtime over WebSocket, WebRTC's HTTP steps, compressed answers, model-router, and clients behind HTTPS_PROXY
that believe they talk to api.openai.com (litellm, LangChain, and the tokenizer host they fetch from).

Nothing leaves the machine: public names reach loopback listeners through azproxy's resolver.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from azproxy import bodies, parameters, relay
from azproxy.addresses import is_public
from azproxy.config import DEFAULT_TUNNEL_ALLOW, load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.emulator import Emulator
from azproxy.emulator.deployments import ROUTED_MODELS
from azproxy.resolver import Endpoint, Resolver
from azproxy.server import build_app
from azproxy.state import STATE
from azproxy.usage import Metered, usage_in_json

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory, ServerFactory

ONLY_4O = "sk-compat-only-gpt-4o-0008"
SECRETS.add(ONLY_4O)

AUTH = {"Authorization": f"Bearer {AZURE_KEY}"}
ASK = [{"role": "user", "content": "hi"}]
TOKENIZER_HOST = "openaipublic.blob.core.windows.net"
TOKENIZER_PATH = "/encodings/cl100k_base.tiktoken"
#: tiktoken's cache name for that URL (its SHA-1), under which litellm ships the file.
_CL100K_CACHE = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"


def _metered(proxy: Proxy) -> list[Metered]:
    seen: list[Metered] = []
    proxy.server.app[STATE].usage.add(seen.append)
    return seen


# 1. Reasoning models' parameters


async def test_refused_parameters_are_renamed_dropped_and_remembered(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy()
    body = (
        '{"model": "o3-mini", "max_tokens": 50,  "messages": [{"role": "user", "content": "hi"}], '
        '"temperature": 0.2}'
    )
    async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH) as client:
        answer = await client.post(
            "/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-azproxy-adjusted"] == "max_tokens->max_completion_tokens,temperature"
        assert [
            json.loads(r.body).keys() & {"max_tokens", "max_completion_tokens", "temperature"}
            for r in emulator.received
        ] == [
            {"max_tokens", "temperature"},
            {"max_completion_tokens", "temperature"},
            {"max_completion_tokens"},
        ]
        assert emulator.last.body == (
            b'{"model": "o3-mini", "max_completion_tokens": 50,  "messages": [{"role": "user", "content": "hi"}]}'
        )

        emulator.received.clear()
        again = await client.post(
            "/chat/completions", json={"model": "o3-mini", "messages": ASK, "max_tokens": 5}
        )
        assert again.status_code == 200
        assert again.headers["x-azproxy-adjusted"] == "max_tokens->max_completion_tokens"
        assert len(emulator.received) == 1  # rewritten from memory before it was sent

        plain = await client.post(
            "/chat/completions", json={"model": "gpt-4o", "messages": ASK, "max_tokens": 5}
        )
        assert "x-azproxy-adjusted" not in plain.headers
        assert b'"max_tokens":5' in emulator.last.body


async def test_with_fixing_off_azure_refusal_reaches_the_client(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy(AZPROXY_FIX_PARAMETERS="false")
    async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH) as client:
        answer = await client.post(
            "/chat/completions", json={"model": "o4-mini", "messages": ASK, "max_tokens": 5}
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", "max_tokens")
    assert len(emulator.received) == 1


async def test_other_refusals_read_for_a_parameter_reach_the_client_whole(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    proxy = await make_proxy()
    refused = [{"role": "user", "content": "__content_filter__"}]
    async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH) as client:
        answer = await client.post("/chat/completions", json={"model": "o3-mini", "messages": refused})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "content_filter"
    assert "x-azproxy-adjusted" not in answer.headers
    assert len(emulator.received) == 1


# 2. The Responses API over WebSocket


async def test_responses_over_websocket_maps_the_model_in_each_create(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    emulator.stream_gate = asyncio.Event()  # the first response waits after its first delta
    proxy = await make_proxy(AZURE_OPENAI_MODEL_MAPPER="my-model=gpt-4o")
    create = '{"type": "response.create", "model": "my-model",  "input": "Say hi", "store": false}'
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(proxy.url / "v1/responses", headers=AUTH) as ws,
    ):
        await ws.send_str(create)
        first = await ws.receive_json(timeout=5)
        await ws.send_str(create)  # one response at a time: Azure's error event passes through
        kinds = [first["type"]]
        errors = []
        while "response.completed" not in kinds:
            event = await ws.receive_json(timeout=5)
            kinds.append(event["type"])
            if event["type"] == "error":
                errors.append(event["error"]["code"])
                emulator.stream_gate.set()
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=5))["error"]["code"] == "invalid_event"
    assert errors == ["response_in_progress"]
    assert emulator.response_frames[0] == create.replace('"my-model"', '"gpt-4o"')
    assert emulator.response_frames[-1] == "not json"
    call = emulator.received[-1]
    assert call.path == "/openai/v1/responses"
    assert call.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in call.headers


async def test_responses_over_websocket_holds_the_model_allowlist(
    make_proxy: ProxyFactory, emulator: Emulator, tmp_path: Path
) -> None:
    clients = tmp_path / "clients.toml"
    clients.write_text('[[client]]\nname = "only-4o"\nkey = "env:ONLY_4O_KEY"\nmodels = ["gpt-4o"]\n')
    proxy = await make_proxy(
        AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_CLIENTS_FILE=str(clients), ONLY_4O_KEY=ONLY_4O
    )
    refused = '{"type": "response.create", "model": "o3-mini", "input": "x", "store": false}'
    allowed = '{"type": "response.create", "model": "gpt-4o", "input": "x", "store": false}'
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(proxy.url / "v1/responses", headers={"Authorization": f"Bearer {ONLY_4O}"}) as ws,
    ):
        await ws.send_str(refused)
        error = await ws.receive_json(timeout=5)
        assert (error["type"], error["status"], error["error"]["code"]) == ("error", 403, "model_not_allowed")
        await ws.send_str(allowed)
        kinds = []
        while "response.completed" not in kinds:
            kinds.append((await ws.receive_json(timeout=5))["type"])
    assert emulator.response_frames == [allowed]  # the refused event never reached Azure


async def test_responses_socket_limit_and_close_code_pass_through(
    make_proxy: ProxyFactory, emulator: Emulator
) -> None:
    emulator.responses_socket_max_age = 0.3
    proxy = await make_proxy()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(proxy.url / "v1/responses", headers=AUTH) as ws,
    ):
        event = await ws.receive_json(timeout=5)
        assert event["error"]["code"] == "websocket_connection_limit_reached"
        closing = await ws.receive(timeout=5)
        assert closing.type is aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1000


# 3. Realtime on v1, and WebRTC's two HTTP steps


async def test_realtime_on_the_v1_api(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(AZPROXY_AZURE_API="v1", AZURE_OPENAI_MODEL_MAPPER="rt=gpt-4o-realtime-preview")
    url = (proxy.url / "v1/realtime").with_query(model="rt")
    async with aiohttp.ClientSession() as session, session.ws_connect(url, headers=AUTH) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
    call = emulator.received[-1]
    assert call.path == "/openai/v1/realtime"
    assert dict(call.query) == {"model": "gpt-4o-realtime-preview"}


@pytest.mark.parametrize("style", ["deployments", "v1"])
async def test_webrtc_client_secret_and_call(
    make_proxy: ProxyFactory, emulator: Emulator, style: str
) -> None:
    proxy = await make_proxy(AZPROXY_AZURE_API=style, AZURE_OPENAI_MODEL_MAPPER="rt=gpt-4o-realtime-preview")
    secret_body = '{"session": {"type": "realtime", "model": "rt",  "instructions": "be brief"}}'
    offer = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    async with httpx.AsyncClient(base_url=proxy.base_url) as client:
        secret = await client.post(
            "/realtime/client_secrets",
            content=secret_body,
            headers=AUTH | {"Content-Type": "application/json"},
        )
        assert secret.status_code == 200, secret.text
        assert emulator.last.path == "/openai/v1/realtime/client_secrets"
        assert emulator.last.body == secret_body.replace('"rt"', '"gpt-4o-realtime-preview"').encode()
        ephemeral = {"Authorization": f"Bearer {secret.json()['value']}"}

        call = await client.post(
            "/realtime/calls",
            params={"model": "rt"},
            content=offer,
            headers=ephemeral | {"Content-Type": "application/sdp"},
        )
        assert call.status_code == 201, call.text
        assert call.headers["Content-Type"].startswith("application/sdp")
        assert call.text.startswith("v=0")
        assert emulator.last.path == "/openai/v1/realtime/calls"
        assert dict(emulator.last.query) == {"model": "gpt-4o-realtime-preview"}
        assert emulator.last.body == offer.encode()

        form = (
            f'--b\r\nContent-Disposition: form-data; name="sdp"\r\n\r\n{offer}\r\n'
            '--b\r\nContent-Disposition: form-data; name="session"\r\n\r\n{"type": "realtime"}\r\n--b--\r\n'
        )
        content_type = {"Content-Type": "multipart/form-data; boundary=b"}
        multipart = await client.post("/realtime/calls", content=form, headers=ephemeral | content_type)
        assert multipart.status_code == 201, multipart.text
        assert emulator.last.body == form.encode()
        assert "model" not in emulator.last.query


# 4. Compressed answers


@pytest.fixture
async def gzip_proxy(start_server: ServerFactory) -> Callable[..., Awaitable[tuple[Proxy, Emulator]]]:
    async def make(**environment: str) -> tuple[Proxy, Emulator]:
        emulator = Emulator(api_keys={AZURE_KEY}, gzip=True)
        upstream = await start_server(emulator.app())
        source = {
            "AZURE_OPENAI_ENDPOINT": str(upstream.make_url("")).rstrip("/"),
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
        } | environment
        return Proxy(await start_server(build_app(load_settings(source)))), emulator

    return make


async def _raw_post(proxy: Proxy, body: dict[str, Any]) -> tuple[aiohttp.ClientResponse, bytes]:
    """POST accepting gzip, the answer's bytes as they came (not decoded)."""
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        headers = AUTH | {"Accept-Encoding": "gzip"}
        async with session.post(proxy.url / "v1/chat/completions", json=body, headers=headers) as answer:
            return answer, await answer.read()


async def test_compressed_answers_still_report_usage(
    gzip_proxy: Callable[..., Awaitable[tuple[Proxy, Emulator]]],
) -> None:
    proxy, _ = await gzip_proxy()
    seen = _metered(proxy)
    answer, raw = await _raw_post(proxy, {"model": "gpt-4o", "messages": ASK})
    assert answer.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["usage"]["total_tokens"] == seen[-1].usage.total
    assert seen[-1].usage.reported

    asked = {"model": "gpt-4o", "messages": ASK, "stream": True, "stream_options": {"include_usage": True}}
    answer, raw = await _raw_post(proxy, asked)
    assert answer.headers["Content-Encoding"] == "gzip"  # unchanged on its way: relayed as it came
    assert b'"usage": {' in gzip.decompress(raw)
    assert seen[-1].usage.reported
    assert not seen[-1].usage.estimated

    answer, raw = await _raw_post(proxy, {"model": "gpt-4o", "messages": ASK, "stream": True})
    assert "Content-Encoding" not in answer.headers  # the usage azproxy asked for is taken out: sent decoded
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in raw
    assert seen[-1].usage.reported
    assert not seen[-1].usage.estimated


async def test_openai_shape_on_compressed_answers(
    gzip_proxy: Callable[..., Awaitable[tuple[Proxy, Emulator]]],
) -> None:
    proxy, _ = await gzip_proxy(AZPROXY_RESPONSE_SHAPE="openai")
    answer, raw = await _raw_post(proxy, {"model": "gpt-4o", "messages": ASK})
    assert "Content-Encoding" not in answer.headers
    document = json.loads(raw)
    assert document["model"] == "gpt-4o"
    assert "prompt_filter_results" not in document

    answer, raw = await _raw_post(proxy, {"model": "gpt-4o", "messages": ASK, "stream": True})
    assert "Content-Encoding" not in answer.headers
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
    assert events
    assert all(event["choices"] and event["model"] == "gpt-4o" for event in events)


# 6. model-router


async def test_model_router_served_model_header(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(AZPROXY_RESPONSE_SHAPE="openai")
    async with httpx.AsyncClient(base_url=proxy.base_url, headers=AUTH) as client:
        answer = await client.post("/chat/completions", json={"model": "model-router", "messages": ASK})
        assert answer.json()["model"] == "model-router"
        assert answer.headers["x-azproxy-served-model"] in ROUTED_MODELS
        stream = await client.post(
            "/chat/completions", json={"model": "model-router", "messages": ASK, "stream": True}
        )
        assert "x-azproxy-served-model" not in stream.headers
        assert '"model":"model-router"' in stream.text


# 5 and 7. Clients behind HTTPS_PROXY


class Forward:
    """azproxy as the forward proxy, trusted through a bundle that also holds the stand-in's CA."""

    def __init__(self, server: TestServer, bundle: Path) -> None:
        self.server = server
        self.bundle = bundle

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class StandIn:
    """A loopback HTTPS server standing in for a public host: the paths it served, the CA its certificate needs."""

    server: TestServer
    ca_file: Path
    served: list[str] = field(default_factory=list)


@pytest.fixture
async def tokenizer_host(tmp_path: Path) -> AsyncIterator[StandIn]:
    """The tokenizer host's stand-in, serving cl100k_base as tiktoken knows it: tiktoken pins its sha256, and
    litellm ships the real file for offline use."""
    spec = importlib.util.find_spec("litellm")
    assert spec is not None
    assert spec.origin is not None
    encoding = (Path(spec.origin).parent / "litellm_core_utils" / "tokenizers" / _CL100K_CACHE).read_bytes()
    served: list[str] = []

    async def blob(request: web.Request) -> web.Response:
        served.append(request.path)
        return web.Response(body=encoding, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get(TOKENIZER_PATH, blob)
    authority = CertificateAuthority(tmp_path / "standin", [TOKENIZER_HOST])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=authority.context_for(TOKENIZER_HOST))
    yield StandIn(server, authority.cert_path, served)
    await server.close()


@pytest.fixture
async def forward(
    start_server: ServerFactory,
    emulator_server: TestServer,
    tokenizer_host: StandIn,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Forward:
    """azproxy with default settings; the tokenizer host resolves to its stand-in, which the public-address
    check is told to count as public where a test says so (the check itself is proven below); the other
    built-in hosts resolve to an address that is never public, so nothing reaches the real ones."""
    overrides: dict[Endpoint, Endpoint] = {
        (target.host, 443): ("127.0.0.2", 9) for target in DEFAULT_TUNNEL_ALLOW
    }
    overrides[TOKENIZER_HOST, 443] = ("127.0.0.1", tokenizer_host.server.port or 0)
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_STATE_DIR": str(tmp_path / "state"),
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
        }
    )
    server = await start_server(build_app(settings, Resolver(overrides)))
    authority = CertificateAuthority(tmp_path / "state", ["api.openai.com"])
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(authority.cert_path.read_bytes() + tokenizer_host.ca_file.read_bytes())
    monkeypatch.setenv("HTTPS_PROXY", str(server.make_url("")).rstrip("/"))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    monkeypatch.setenv("OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    return Forward(server, bundle)


@pytest.fixture
def stand_in_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "azproxy.resolver.is_public", lambda address: address == "127.0.0.1" or is_public(address)
    )


async def test_litellm_streams_through_https_proxy(forward: Forward, monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm raised IndexError on Azure's filter-only first chunk; forward arrivals get OpenAI's shape."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of the cost map at import
    monkeypatch.setenv("LITELLM_TELEMETRY", "False")
    import litellm

    def run() -> str:
        stream = litellm.completion(model="openai/gpt-4o", messages=ASK, stream=True, api_key=AZURE_KEY)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert await asyncio.to_thread(run) == "Hello from the Azure OpenAI emulator. You said: hi"


@pytest.mark.usefixtures("stand_in_is_public")
async def test_langchain_embeddings_fetch_their_tokenizer_through_the_proxy(
    forward: Forward, tokenizer_host: StandIn, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tiktoken.registry
    from langchain_openai import OpenAIEmbeddings

    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)  # loaded by another test
    embeddings = OpenAIEmbeddings(model="text-embedding-3-small")
    vector = await asyncio.to_thread(embeddings.embed_query, "hello world")
    assert vector
    assert tokenizer_host.served == [TOKENIZER_PATH]
    assert emulator.last.path == "/openai/deployments/text-embedding-3-small/embeddings"
    assert isinstance(json.loads(emulator.last.body)["input"][0], list)  # token ids, from the tokenizer


async def test_built_in_tunnel_hosts_reach_only_public_addresses(
    forward: Forward, tokenizer_host: StandIn
) -> None:
    """Unpatched, the stand-in's loopback address is what the SSRF guard refuses."""
    async with httpx.AsyncClient(
        proxy=forward.url, verify=ssl.create_default_context(cafile=forward.bundle)
    ) as client:
        with pytest.raises(httpx.ProxyError, match="403"):
            await client.get(f"https://{TOKENIZER_HOST}{TOKENIZER_PATH}")
    assert tokenizer_host.served == []


async def test_refused_tunnels_are_logged_with_the_setting(
    forward: Forward, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "azproxy")
    reader, writer = await asyncio.open_connection("127.0.0.1", forward.server.port)
    writer.write(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 403")
    writer.close()
    assert "AZPROXY_TUNNEL_ALLOW=example.org:443 would allow it" in caplog.text


async def test_built_in_tunnel_hosts_can_be_switched_off(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(AZPROXY_TUNNEL_ALLOW_DEFAULTS="false")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(f"CONNECT {TOKENIZER_HOST}:443 HTTP/1.1\r\nHost: {TOKENIZER_HOST}:443\r\n\r\n".encode())
    assert (await reader.readline()).startswith(b"HTTP/1.1 403")
    writer.close()


@pytest.mark.parametrize(
    ("body", "removed"),
    [
        (b'{"a": 1, "t": 2 ,"c": 3}', b'{"a": 1, "c": 3}'),
        (b'{"a": 1,"t": 2}', b'{"a": 1}'),
        (b'{ "t": 2 }', b"{  }"),
        (b'{"a": {"t": 1}, "t": 2}', b'{"a": {"t": 1}}'),
    ],
)
def test_remove_member_keeps_every_other_byte(body: bytes, removed: bytes) -> None:
    assert bodies.remove_member(body, "t") == removed
    assert json.loads(removed) == {k: v for k, v in json.loads(body).items() if k != "t"}


def test_adjustments_rename_or_drop() -> None:
    body = b'{"max_tokens": 5, "max_completion_tokens": 7, "top_p": 1}'
    adjusted, made = parameters.apply(body, [parameters.Adjustment("max_tokens", "max_completion_tokens")])
    assert adjusted == b'{"max_completion_tokens": 7, "top_p": 1}'  # the client said both: the old one goes
    assert parameters.header_value(made) == "max_tokens->max_completion_tokens"
    refusal = (
        b'{"error": {"code": "unsupported_parameter", "message": "Unsupported parameter: \'top_p\' ..."}}'
    )
    assert parameters.refused(400, refusal) == parameters.Adjustment("top_p")
    assert parameters.refused(400, b'{"error": {"code": "unsupported_parameter", "param": "tools"}}') is None
    memory = parameters.ParameterMemory(limit=1)
    memory.remember("east", "o3", parameters.Adjustment("top_p"))
    memory.remember("east", "o4", parameters.Adjustment("top_p"))
    assert memory.get("east", "o3") == ()


def test_a_compressed_answer_is_decoded_in_bounded_steps() -> None:
    usage = b'"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}'
    data = b'{"x": "' + b"a" * (3 * relay.DECODE_STEP) + b'", ' + usage
    compressed = gzip.compress(data)
    chunks = (compressed[:100], compressed[100:])
    decoder = relay._StreamDecoder.for_encoding(["gzip"])
    assert decoder is not None
    pieces = [piece for chunk in chunks for piece in decoder.pieces(chunk)]
    assert max(map(len, pieces)) <= relay.DECODE_STEP
    assert b"".join(pieces) == data
    tail = bytearray()
    tail_decoder = relay._StreamDecoder.for_encoding(["gzip"])
    for chunk in chunks:
        relay._keep_tail(tail, chunk, tail_decoder)
    assert len(tail) == relay.USAGE_TAIL
    assert usage_in_json(bytes(tail)).total == 3
    assert relay._StreamDecoder.for_encoding(["br"]) is None


# 4. Azure API Management in front of Azure OpenAI


class Recorder:
    """Stands in for API Management: records each request's path and headers, answers a chat completion."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    async def answer(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, dict(request.headers)))
        return web.json_response({"id": "c1", "object": "chat.completion", "model": "gpt-4o", "choices": []})


async def recorder(start_server: ServerFactory) -> tuple[Recorder, str]:
    record = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record.answer)
    server = await start_server(app)
    return record, str(server.make_url("")).rstrip("/")


async def test_apim_prefix_is_kept_and_the_key_goes_under_its_header(
    start_server: ServerFactory, make_proxy: ProxyFactory
) -> None:
    apim, base = await recorder(start_server)
    proxy = await make_proxy(
        AZURE_OPENAI_ENDPOINT=f"{base}/openai-prod",
        AZURE_OPENAI_TOKEN=AZURE_KEY,
        AZPROXY_API_KEY_HEADER="Ocp-Apim-Subscription-Key",
        AZURE_OPENAI_PROXY_ADDRESS="127.0.0.1:8080",
    )
    async with httpx.AsyncClient(base_url=str(proxy.url)) as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": []},
            headers={"Authorization": "Bearer ignored", "Ocp-Apim-Subscription-Key": "a-client-copy"},
        )
    assert reply.status_code == 200
    ((path, headers),) = apim.seen
    assert path == "/openai-prod/openai/deployments/gpt-4o/chat/completions"
    assert headers["Ocp-Apim-Subscription-Key"] == AZURE_KEY  # the server's key, never the client's copy
    assert "api-key" not in headers
    assert "Authorization" not in headers


async def test_a_forwarded_client_key_and_a_backend_table_use_the_apim_header(
    start_server: ServerFactory, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    apim, base = await recorder(start_server)
    forwarding = await make_proxy(
        AZURE_OPENAI_ENDPOINT=base, AZPROXY_API_KEY_HEADER="Ocp-Apim-Subscription-Key"
    )
    async with httpx.AsyncClient(base_url=str(forwarding.url)) as client:
        await client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers={"api-key": "client-own"})
    assert apim.seen[-1][1]["Ocp-Apim-Subscription-Key"] == "client-own"
    config = tmp_path / "azproxy.toml"
    config.write_text(
        f'[[backend]]\nname = "apim"\nendpoint = "{base}/gw"\napi_key = "env:APIM_KEY"\n'
        'api_key_header = "Ocp-Apim-Subscription-Key"\n'
    )
    table = await make_proxy(
        AZPROXY_CONFIG=str(config), APIM_KEY=AZURE_KEY, AZURE_OPENAI_PROXY_ADDRESS="127.0.0.1:8080"
    )
    async with httpx.AsyncClient(base_url=str(table.url)) as client:
        await client.post("/v1/chat/completions", json={"model": "gpt-4o"}, headers={"api-key": "ignored"})
    path, headers = apim.seen[-1]
    assert path == "/gw/openai/deployments/gpt-4o/chat/completions"
    assert headers["Ocp-Apim-Subscription-Key"] == AZURE_KEY
    assert "api-key" not in headers


async def test_an_endpoint_copied_with_openai_is_recognised(
    make_proxy: ProxyFactory,
    emulator_server: TestServer,
    emulator: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = str(emulator_server.make_url("")).rstrip("/") + "/openai/"
    proxy = await make_proxy(AZURE_OPENAI_ENDPOINT=endpoint)
    async with httpx.AsyncClient(base_url=str(proxy.url)) as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {AZURE_KEY}"},
        )
    assert reply.status_code == 200
    assert emulator.last.path == "/openai/deployments/gpt-4o/chat/completions"  # not /openai/openai/...
    assert any("ends in /openai" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
