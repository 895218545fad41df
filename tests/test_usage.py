"""Token usage for every answer: plain and streamed, asked for by azproxy when the client did not, taken out again
before the client sees it, charged to limits, and estimated for a client that leaves mid-stream."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from azproxy.emulator import Emulator
from azproxy.state import STATE
from azproxy.usage import Metered, StreamMeter, TokenUsage, usage_in_json

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory

LIMITED = "sk-limited-client-key-0003"
SECRETS.add(LIMITED)
PROMPT = "one two three four five"
STREAM = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}


def observe(proxy: Proxy) -> list[Metered]:
    """Subscribes to the proxy's usage seam, as metrics and logs do."""
    seen: list[Metered] = []
    proxy.server.app[STATE].usage.add(seen.append)
    return seen


async def read_stream(proxy: Proxy, body: dict[str, object], key: str = AZURE_KEY) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy.url / "v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        return await response.read()


def events(raw: bytes) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]


async def test_stream_usage_is_asked_for_and_taken_out(proxy: Proxy, emulator: Emulator) -> None:
    seen = observe(proxy)
    raw = await read_stream(proxy, STREAM)
    sent = json.loads(emulator.last.body)
    assert sent["stream_options"] == {"include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == STREAM
    added = b'"stream_options":{"include_usage":true},'
    assert emulator.last.body == b"{" + added + json.dumps(STREAM).encode()[1:]  # every other byte as sent
    # The client sees exactly the stream it asked for: no usage chunk, no `"usage": null` on the others.
    assert b"usage" not in raw
    chunks = events(raw)
    assert chunks[0]["choices"] == []  # Azure's filter-only chunk is the client's, and stays
    assert all(chunk["choices"] for chunk in chunks[1:])
    assert raw.endswith(b"data: [DONE]\n\n")
    assert [m.usage for m in seen] == [TokenUsage(prompt=5, completion=13, total=18)]
    assert seen[0].model == "gpt-4o"


async def test_a_client_asking_for_usage_gets_it_unchanged(proxy: Proxy, emulator: Emulator) -> None:
    seen = observe(proxy)
    raw = await read_stream(proxy, STREAM | {"stream_options": {"include_usage": True}})
    assert json.loads(emulator.last.body)["stream_options"] == {"include_usage": True}
    assert events(raw)[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 13, "total_tokens": 18}
    assert b'"usage": null' in raw
    assert seen[0].usage.total == 18


async def test_other_stream_options_are_kept(proxy: Proxy, emulator: Emulator) -> None:
    await read_stream(proxy, STREAM | {"stream_options": {"include_usage": False, "x": 1}})
    assert json.loads(emulator.last.body)["stream_options"] == {"include_usage": True, "x": 1}


async def test_stream_usage_off(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(AZPROXY_STREAM_USAGE="false")
    seen = observe(proxy)
    await read_stream(proxy, STREAM)
    assert "stream_options" not in json.loads(emulator.last.body)
    assert seen[0].usage == TokenUsage()


async def test_plain_answers_report_usage(proxy: Proxy, sdk: openai.AsyncOpenAI) -> None:
    seen = observe(proxy)
    await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": PROMPT}])
    await sdk.embeddings.create(model="text-embedding-3-small", input=PROMPT)
    stream = await sdk.responses.create(model="gpt-4o", input=PROMPT, stream=True)
    async for _ in stream:
        pass
    chat, embeddings, responses = (m.usage for m in seen)
    assert chat == TokenUsage(prompt=5, completion=13, total=18)
    assert embeddings.prompt == embeddings.total
    assert embeddings.completion == 0
    assert embeddings.reported
    assert responses.reported
    assert not responses.estimated
    assert [m.model for m in seen] == ["gpt-4o", "text-embedding-3-small", "gpt-4o"]


async def test_errors_report_no_usage(proxy: Proxy, sdk: openai.AsyncOpenAI) -> None:
    seen = observe(proxy)
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(
            model="no-such-deployment", messages=[{"role": "user", "content": "x"}]
        )
    assert [m.usage for m in seen] == [TokenUsage()]


@pytest.fixture
async def limited(make_proxy: ProxyFactory, tmp_path: Path) -> Proxy:
    clients = tmp_path / "clients.toml"
    digest = hashlib.sha256(LIMITED.encode()).hexdigest()
    clients.write_text(f'[[client]]\nname = "limited"\nkey = "sha256:{digest}"\ntpm = 30\n')
    return await make_proxy(AZURE_OPENAI_TOKEN=AZURE_KEY, AZPROXY_CLIENTS_FILE=str(clients))


async def test_streams_that_did_not_ask_for_usage_are_charged(limited: Proxy, emulator: Emulator) -> None:
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                limited.url / "v1/chat/completions",
                json=STREAM,
                headers={"Authorization": f"Bearer {LIMITED}"},
            ) as response:
                statuses.append(response.status)
                body = await response.read()
                assert b"usage" not in body
            await asyncio.sleep(0)  # let the charge land, as any real client's next request would
    assert statuses == [200, 200, 429]  # 18 tokens, then 36 of 30: the third is refused
    assert len(emulator.received) == 2


async def test_a_client_leaving_mid_stream_is_charged(limited: Proxy, emulator: Emulator) -> None:
    seen = observe(limited)
    emulator.stream_gate = asyncio.Event()  # the emulator holds the stream after its first content chunk
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            limited.url / "v1/chat/completions", json=STREAM, headers={"Authorization": f"Bearer {LIMITED}"}
        ) as response,
    ):
        received = b""
        while b"Hello" not in received:
            received += await asyncio.wait_for(response.content.readany(), 5)
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    body_bytes = len(json.dumps(STREAM).encode())  # what the client sent, before azproxy added stream_options
    usage = seen[0].usage
    assert usage.estimated
    assert usage.prompt == -(-body_bytes // 4)
    assert usage.completion is not None
    assert usage.completion >= 1
    assert seen[0].client is not None
    assert seen[0].client.name == "limited"
    emulator.stream_gate.set()


def test_stream_meter_across_chunk_boundaries() -> None:
    stream = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\r\n\r\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}\r\n\r\n'
        b"data: [DONE]\r\n\r\n"
    )
    for size in (1, 3, 7, len(stream)):
        meter = StreamMeter(hide_usage=True)
        out = b"".join(meter.feed(stream[i : i + size]) for i in range(0, len(stream), size)) + meter.finish()
        assert out == b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\ndata: [DONE]\r\n\r\n'
        assert meter.usage == TokenUsage(2, 1, 3)
        plain = StreamMeter(hide_usage=False)
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert [
            plain.feed(chunk) for chunk in chunks
        ] == chunks  # not hiding: every chunk goes out as it came
        assert plain.usage == TokenUsage(2, 1, 3)


def test_stream_meter_bounds_a_partial_event() -> None:
    meter = StreamMeter(hide_usage=True)
    flood = b"data: " + b"x" * (StreamMeter.MAX_PENDING + 10)
    assert meter.feed(flood) == flood  # past the bound an event goes out as it is, never held without end


def test_usage_in_json_reads_the_last_usage_only() -> None:
    body = json.dumps(
        {"choices": [{"message": {"content": '"usage": {"total_tokens": 99}'}}], "usage": {"total_tokens": 7}}
    ).encode()
    assert usage_in_json(body) == TokenUsage(None, None, 7)
    assert usage_in_json(
        b'{"object": "response", "usage": {"input_tokens": 3, "output_tokens": 4}}'
    ) == TokenUsage(3, 4, 7)
    assert usage_in_json(b"not json") == TokenUsage()
