"""Operating azproxy: one access-log line per request with the facts of its record, request ids end to end, and
Prometheus metrics that move by exactly the traffic sent."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from azproxy.accesslog import FIELDS
from azproxy.config import load_settings
from azproxy.edge.certs import CertificateAuthority
from azproxy.emulator import Emulator
from azproxy.metrics import MAX_MODELS, OTHER_MODEL, Metrics
from azproxy.record import RequestRecord, request_id_for
from azproxy.server import build_app

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory, ServerFactory

CLIENT_KEY = "sk-observed-client-key-0006"
METRICS_KEY = "metrics-scraper-key-0007"
SECRETS.update({CLIENT_KEY, METRICS_KEY})
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three four five"}]}
AUTH = {"Authorization": f"Bearer {AZURE_KEY}"}


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "azproxy.access"]


async def post(
    proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(proxy.url / "v1/chat/completions", json=body, headers=headers or AUTH)
        await response.read()
        return response


async def test_a_plain_answer_is_one_line_with_every_field(
    proxy: Proxy, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    response = await post(proxy, CHAT)
    (line,) = access_lines(caplog)
    assert list(line) == list(FIELDS)
    sent_id = response.headers["x-azproxy-request-id"]
    assert line["request_id"] == sent_id
    assert emulator.last.headers["x-ms-client-request-id"] == sent_id  # Azure's log names it alike
    assert line["upstream_request_id"] == response.headers["apim-request-id"]
    body = await response.read()
    assert {
        k: line[k] for k in ("arrival", "method", "path", "target", "client", "status", "aborted", "error")
    } == {
        "arrival": "reverse",
        "method": "POST",
        "path": "/v1/chat/completions",
        "target": None,
        "client": None,
        "status": 200,
        "aborted": False,
        "error": None,
    }
    assert (line["model"], line["deployment"], line["backend"], line["attempts"]) == (
        "gpt-4o",
        "gpt-4o",
        "azure",
        1,
    )
    assert line["bytes_in"] == len(json.dumps(CHAT))
    assert line["bytes_out"] == len(body)
    assert (line["prompt_tokens"], line["completion_tokens"], line["stream"], line["chunks"]) == (
        5,
        13,
        False,
        0,
    )
    assert 0 <= line["ttfb_ms"] <= line["duration_ms"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])


async def test_request_ids_from_the_client_are_kept_when_sane(
    proxy: Proxy, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    kept = await post(proxy, CHAT, AUTH | {"x-request-id": "trace-abc.123:4"})
    assert kept.headers["x-azproxy-request-id"] == "trace-abc.123:4"
    assert emulator.last.headers["x-ms-client-request-id"] == "trace-abc.123:4"
    replaced = await post(proxy, CHAT, AUTH | {"x-request-id": "has spaces\tand\ttabs"})
    assert re.fullmatch(r"[0-9a-f-]{36}", replaced.headers["x-azproxy-request-id"])
    assert [line["request_id"] for line in access_lines(caplog)] == [
        "trace-abc.123:4",
        replaced.headers["x-azproxy-request-id"],
    ]


async def test_streams_and_aborted_streams(
    proxy: Proxy, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    await post(proxy, CHAT | {"stream": True})
    emulator.stream_gate = asyncio.Event()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions", json=CHAT | {"stream": True}, headers=AUTH
        ) as response,
    ):
        received = b""
        while b"Hello" not in received:
            received += await asyncio.wait_for(response.content.readany(), 5)
    for _ in range(200):
        if len(access_lines(caplog)) == 2:
            break
        await asyncio.sleep(0.01)
    emulator.stream_gate.set()
    whole, cut = access_lines(caplog)
    assert (whole["stream"], whole["aborted"], whole["status"]) == (True, False, 200)
    assert whole["chunks"] > 10
    assert whole["bytes_out"] > 0
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (5, 13)  # asked for by azproxy, taken out
    assert (cut["stream"], cut["aborted"], cut["status"]) == (True, True, 200)


async def test_azproxys_own_refusals_name_their_error(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=CLIENT_KEY)
    refused = await post(guarded, CHAT, {"Authorization": "Bearer sk-wrong-key-but-long-enough"})
    assert refused.status == 401
    assert refused.headers["x-azproxy-request-id"]
    (line,) = access_lines(caplog)
    assert (line["status"], line["error"], line["model"]) == (401, "invalid_api_key", None)
    assert line["request_id"] == refused.headers["x-azproxy-request-id"]


async def test_connect_and_requests_inside_tunnels(
    start_server: ServerFactory,
    emulator_server: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
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
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n")
    refused = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    for _ in range(200):
        if len(access_lines(caplog)) == 3:
            break
        await asyncio.sleep(0.01)
    lines = access_lines(caplog)
    (inside,) = [line for line in lines if line["method"] == "POST"]
    (tunnel,) = [line for line in lines if line["method"] == "CONNECT" and line["status"] == 200]
    (forbidden,) = [line for line in lines if line["method"] == "CONNECT" and line["status"] == 403]
    assert (inside["arrival"], inside["path"], inside["target"], inside["status"]) == (
        "tunnel",
        "/v1/chat/completions",
        "api.openai.com:443",
        200,
    )
    assert (tunnel["method"], tunnel["arrival"], tunnel["target"], tunnel["status"]) == (
        "CONNECT",
        "tunnel",
        "api.openai.com:443",
        200,
    )
    # the tunnel's decrypted bytes each way hold the request inside and its answer
    assert tunnel["bytes_in"] > inside["bytes_in"] > 0
    assert tunnel["bytes_out"] > inside["bytes_out"] > 0
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert (forbidden["method"], forbidden["target"], forbidden["status"], forbidden["error"]) == (
        "CONNECT",
        "elsewhere.example:443",
        403,
        "tunnel_target_forbidden",
    )


def sample(metrics: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text, 0 when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.partition("{")[0] != name:
            continue
        found = ",".join(sorted(metric.partition("{")[2].rstrip("}").split(","))) if "{" in metric else ""
        if found == wanted:
            return float(value)
    return 0.0


async def metrics_text(proxy: Proxy, headers: dict[str, str] | None = None) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url / "metrics", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


async def test_metrics_move_by_exactly_the_traffic_sent(proxy: Proxy, emulator: Emulator) -> None:
    before = await metrics_text(proxy)
    await post(proxy, CHAT)
    raw = await (await post(proxy, CHAT | {"stream": True})).read()
    assert b"usage" not in raw  # the client never sees the usage chunk azproxy asked for
    await post(proxy, CHAT | {"model": "no-such-deployment"})
    after = await metrics_text(proxy)
    labels = {"arrival": "reverse", "model": "gpt-4o", "backend": "azure"}
    for name, wanted, delta in (
        ("azproxy_requests_total", labels | {"status": "200"}, 2),
        # a model no request succeeded for counts as "other": random names cannot grow the registry
        ("azproxy_requests_total", labels | {"model": "other", "status": "404"}, 1),
        ("azproxy_tokens_total", {"model": "gpt-4o", "client": "", "type": "input"}, 10),
        ("azproxy_tokens_total", {"model": "gpt-4o", "client": "", "type": "output"}, 26),
        ("azproxy_upstream_attempts_total", {"backend": "azure", "outcome": "ok"}, 3),
        ("azproxy_request_duration_seconds_count", {"model": "gpt-4o", "backend": "azure"}, 2),
        (
            "gen_ai_client_token_usage_sum",
            {
                "gen_ai_operation_name": "chat",
                "gen_ai_provider_name": "azure.ai.openai",
                "gen_ai_request_model": "gpt-4o",
                "gen_ai_token_type": "input",
            },
            10,
        ),
    ):
        assert sample(after, name, **wanted) - sample(before, name, **wanted) == delta, (name, wanted)
    assert sample(after, "azproxy_backend_available", backend="azure") == 1
    assert sample(after, "azproxy_open_streams") == 0


async def test_metrics_need_a_key_when_clients_have_keys(make_proxy: ProxyFactory) -> None:
    guarded = await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=CLIENT_KEY)
    async with aiohttp.ClientSession() as session, session.get(guarded.url / "metrics") as response:
        assert response.status == 401
    await metrics_text(guarded, {"Authorization": f"Bearer {CLIENT_KEY}"})
    scraped = await make_proxy(
        AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_API_KEYS=CLIENT_KEY, AZPROXY_METRICS_KEY=METRICS_KEY
    )
    await metrics_text(scraped, {"Authorization": f"Bearer {METRICS_KEY}"})
    async with (
        aiohttp.ClientSession() as session,
        session.get(scraped.url / "metrics", headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as response,
    ):
        assert response.status == 401  # with a metrics key set, only that key reads them
    off = await make_proxy(AZPROXY_METRICS="false")
    async with aiohttp.ClientSession() as session, session.get(off.url / "metrics", headers=AUTH) as response:
        assert response.status == 404


async def test_a_blind_tunnel_logs_its_bytes_each_way(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(data * 2)
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    target_port = target.sockets[0].getsockname()[1]
    proxy = await make_proxy(AZPROXY_TUNNEL_ALLOW=f"127.0.0.1:{target_port}")
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.port)
    writer.write(
        f"CONNECT 127.0.0.1:{target_port} HTTP/1.1\r\nHost: 127.0.0.1:{target_port}\r\n\r\n".encode()
    )
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    writer.write(b"12345")
    assert await asyncio.wait_for(reader.read(), 5) == b"1234512345"
    writer.close()
    for _ in range(200):
        if access_lines(caplog):
            break
        await asyncio.sleep(0.01)
    target.close()
    (line,) = access_lines(caplog)
    assert (line["method"], line["arrival"], line["target"], line["status"]) == (
        "CONNECT",
        "blind",
        f"127.0.0.1:{target_port}",
        200,
    )
    assert (line["bytes_in"], line["bytes_out"]) == (5, 10)


def test_azproxy_ca_says_when_it_made_a_new_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from azproxy.cli import main

    monkeypatch.setenv("AZPROXY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AZPROXY_ENV_FILE", str(tmp_path / "empty.env"))
    (tmp_path / "empty.env").write_text("")
    assert main(["ca", "--pem"]) == 0
    made = capsys.readouterr()
    assert made.out.startswith("-----BEGIN CERTIFICATE-----")
    assert "made a new one" in made.err
    assert main(["ca", "--pem"]) == 0
    again = capsys.readouterr()
    assert again.out == made.out
    assert again.err == ""


def test_the_open_relay_refusal_names_entra_when_entra_is_the_credential() -> None:
    from azproxy.config import ConfigError

    with pytest.raises(
        ConfigError, match=r"^AZPROXY_AUTH=entra is set and azproxy would listen on 0\.0\.0\.0:8080"
    ):
        load_settings({"AZURE_OPENAI_ENDPOINT": "https://res.openai.azure.com", "AZPROXY_AUTH": "entra"})


def test_model_labels_are_bounded_against_clients_naming_random_models() -> None:
    """A model gets a label of its own once a request for it succeeded, at most MAX_MODELS of them; names that
    only met refusals, and any past the bound, count as `other`, so the registry cannot grow without bound."""
    metrics = Metrics()

    def observe(model: str, status: int) -> None:
        metrics.observe(
            RequestRecord("id", "POST", "/v1/chat/completions", 0.0, model=model, status=status), 0.01
        )

    for index in range(20):
        observe(f"junk-{index}", 404)  # refused names take no place
    for index in range(MAX_MODELS + 50):
        observe(f"model-{index}", 200)
    observe("model-0", 429)  # a model with its own label keeps it whatever the status
    text = metrics.render().decode()
    models = set(re.findall(r'azproxy_requests_total\{[^}]*model="([^"]+)"', text))
    assert len(models) == MAX_MODELS + 1
    assert OTHER_MODEL in models
    assert "model-0" in models
    assert not any(name.startswith("junk-") for name in models)
    assert f"model-{MAX_MODELS}" not in models
    requests = "azproxy_requests_total"
    assert sample(text, requests, arrival="reverse", model=OTHER_MODEL, backend="", status="404") == 20
    assert sample(text, requests, arrival="reverse", model=OTHER_MODEL, backend="", status="200") == 50
    assert sample(text, requests, arrival="reverse", model="model-0", backend="", status="429") == 1


def test_request_ids_azproxy_makes_are_random_version_4_uuids() -> None:
    made = {request_id_for(CIMultiDictProxy(CIMultiDict())) for _ in range(10_000)}
    assert len(made) == 10_000
    for made_id in list(made)[:1000]:
        parsed = uuid.UUID(made_id)
        assert str(parsed) == made_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
