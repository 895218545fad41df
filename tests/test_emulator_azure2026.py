"""The emulator's 2026 Azure behaviours: reasoning deployments, gzip, the asynchronous filter, model-router,
Responses over WebSocket, realtime on v1 and the WebRTC set-up."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletionMessageParam

from azproxy.emulator import Emulator

from .conftest import AZURE_KEY, ServerFactory

PREVIEW = "2025-04-01-preview"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
OFFER = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


def endpoint(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"api-key": AZURE_KEY}) as session:
        yield session


@pytest.fixture
async def v1(emulator_server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{endpoint(emulator_server)}/openai/v1/", api_key=AZURE_KEY, max_retries=0
    ) as client:
        yield client


async def serve(start_server: ServerFactory, emulator: Emulator) -> str:
    return endpoint(await start_server(emulator.app()))


def sse_data(text: str) -> list[Any]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


# 1. reasoning deployments


@pytest.mark.parametrize("deployment", ["o3-mini", "o4-mini", "gpt-5"])
async def test_reasoning_deployments_refuse_max_tokens(
    emulator_server: TestServer, http: aiohttp.ClientSession, deployment: str
) -> None:
    url = f"{endpoint(emulator_server)}/openai/deployments/{deployment}/chat/completions"
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0.2}
    async with http.post(url, params={"api-version": PREVIEW}, json=body) as response:
        assert response.status == 400
        assert await response.json() == {
            "error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                "Use 'max_completion_tokens' instead.",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "unsupported_parameter",
            }
        }


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 0.2, "top_p": 0.5}, "temperature"),
        ({"logprobs": True, "top_p": 0.5}, "top_p"),
        ({"frequency_penalty": 1, "presence_penalty": 1}, "presence_penalty"),
        ({"frequency_penalty": 1, "logprobs": True}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
    ],
)
async def test_reasoning_deployments_refuse_sampling_parameters_one_at_a_time(
    v1: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await v1.chat.completions.create(model="o4-mini", messages=MESSAGES, extra_body=extra)
    assert refused.value.code == "unsupported_parameter"
    assert refused.value.param == param
    assert refused.value.body == {
        "message": f"Unsupported parameter: '{param}' is not supported with this model.",
        "type": "invalid_request_error",
        "param": param,
        "code": "unsupported_parameter",
    }


async def test_reasoning_deployments_answer_max_completion_tokens_and_others_keep_max_tokens(
    v1: openai.AsyncOpenAI,
) -> None:
    answer = await v1.chat.completions.create(
        model="gpt-5",
        messages=MESSAGES,
        max_completion_tokens=50,
        temperature=None,
    )
    assert answer.model == "gpt-5-2025-08-07"
    plain = await v1.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=10,
        temperature=0.2,
        logprobs=True,
    )
    assert plain.model == "gpt-4o-2024-08-06"


# 2. gzip


async def test_gzip_only_when_switched_on_and_asked(start_server: ServerFactory) -> None:
    url = "/openai/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": MESSAGES}
    plain = await serve(start_server, Emulator(api_keys={AZURE_KEY}))
    zipped = await serve(start_server, Emulator(api_keys={AZURE_KEY}, gzip=True))
    async with aiohttp.ClientSession(headers={"api-key": AZURE_KEY}, auto_decompress=False) as session:
        async with session.post(plain + url, json=body, headers={"Accept-Encoding": "gzip"}) as response:
            assert "Content-Encoding" not in response.headers
            json.loads(await response.read())
        for refused in ("identity", "gzip;q=0, identity"):
            async with session.post(
                zipped + url, json=body, headers={"Accept-Encoding": refused}
            ) as response:
                assert "Content-Encoding" not in response.headers
        async with session.post(zipped + url, json=body, headers={"Accept-Encoding": "br, gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            raw = await response.read()
            assert int(response.headers["Content-Length"]) == len(raw)
            assert json.loads(gzip.decompress(raw))["object"] == "chat.completion"
        missing = {"model": "nope", "messages": MESSAGES}
        async with session.post(zipped + url, json=missing, headers={"Accept-Encoding": "gzip"}) as response:
            assert response.status == 404
            assert json.loads(gzip.decompress(await response.read()))["error"]["code"] == "DeploymentNotFound"


async def test_gzip_streams_decode_event_by_event(start_server: ServerFactory) -> None:
    emulator = Emulator(api_keys={AZURE_KEY}, gzip=True)
    emulator.stream_gate = asyncio.Event()
    url = await serve(start_server, emulator) + "/openai/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    decoder = zlib.decompressobj(wbits=31)
    async with (
        aiohttp.ClientSession(headers={"api-key": AZURE_KEY}, auto_decompress=False) as session,
        session.post(url, json=body, headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert response.headers["Content-Encoding"] == "gzip"
        text = ""
        while '"Hello "' not in text:  # the first content chunk arrives, and decodes, while the gate holds
            text += decoder.decompress(await asyncio.wait_for(response.content.readany(), 5)).decode()
        assert text.endswith("\n\n")
        assert emulator.streams_finished == 0
        emulator.stream_gate.set()
        text += decoder.decompress(await response.content.read()).decode()
    assert decoder.eof
    assert text.endswith("data: [DONE]\n\n")
    chunks = sse_data(text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]).endswith(
        "one two three"
    )


async def test_sdk_reads_gzip_streams(start_server: ServerFactory) -> None:
    url = await serve(start_server, Emulator(api_keys={AZURE_KEY}, gzip=True))
    async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1/", api_key=AZURE_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.endswith("one two three")


# 3. the asynchronous filter


async def test_async_filter_annotations_mid_stream(start_server: ServerFactory) -> None:
    emulator = Emulator(api_keys={AZURE_KEY}, async_filter=True, chunks=7)
    url = await serve(start_server, emulator) + "/openai/v1/chat/completions"
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with (
        aiohttp.ClientSession(headers={"api-key": AZURE_KEY}) as session,
        session.post(url, json=body) as r,
    ):
        chunks = sse_data(await r.text())
    annotations = [c for c in chunks if c["choices"] and "content_filter_offsets" in c["choices"][0]]
    assert [a["choices"][0]["content_filter_offsets"] for a in annotations] == [
        {"check_offset": 0, "start_offset": 0, "end_offset": 9},
        {"check_offset": 9, "start_offset": 9, "end_offset": 18},
        {"check_offset": 18, "start_offset": 18, "end_offset": 21},
    ]
    for annotation in annotations:
        assert set(annotation["choices"][0]) == {
            "index",
            "finish_reason",
            "content_filter_offsets",
            "content_filter_results",
        }
        assert (annotation["id"], annotation["model"], annotation["object"]) == ("", "", "")
    content = [c for c in chunks if c["choices"] and c["choices"][0].get("delta", {}).get("content")]
    assert all("content_filter_results" not in c["choices"][0] for c in content)
    kinds = [
        "a" if c in annotations else "f" if c["choices"] and c["choices"][0].get("finish_reason") else "-"
        for c in chunks
    ]
    assert kinds[-2:] == ["f", "a"]  # the last annotation lags the finish chunk
    assert emulator.streams_finished == 1


async def test_async_filter_is_off_by_default_and_sdk_tolerates_it(
    start_server: ServerFactory, v1: openai.AsyncOpenAI
) -> None:
    stream = await v1.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert not [
        c
        async for c in stream
        if c.choices and (c.choices[0].model_extra or {}).get("content_filter_offsets")
    ]
    url = await serve(start_server, Emulator(api_keys={AZURE_KEY}, async_filter=True))
    async with openai.AsyncOpenAI(base_url=f"{url}/openai/v1/", api_key=AZURE_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join(
            [c.choices[0].delta.content or "" async for c in stream if c.choices and c.choices[0].delta]
        )
    assert text.endswith("one two three")


# 4. model-router


async def test_model_router_names_the_model_that_served(
    emulator_server: TestServer, v1: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    served = {
        (await v1.chat.completions.create(model="model-router", messages=MESSAGES)).model for _ in range(3)
    }
    assert len(served) == 3
    assert "gpt-4.1-mini-2025-04-14" in served
    assert "model-router" not in " ".join(served)
    stream = await v1.chat.completions.create(model="model-router", messages=MESSAGES, stream=True)
    models = {chunk.model async for chunk in stream if chunk.choices}
    assert len(models) == 1
    assert models <= served
    response = await v1.responses.create(model="model-router", input="hi")
    assert response.model in served
    url = f"{endpoint(emulator_server)}/openai/deployments/model-router/chat/completions"
    async with http.post(url, params={"api-version": PREVIEW}, json={"messages": MESSAGES}) as answer:
        assert (await answer.json())["model"] in served


# 5. Responses over WebSocket


async def receive_until(socket: aiohttp.ClientWebSocketResponse, kind: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] != kind:
        events.append(await socket.receive_json(timeout=5))
    return events


async def test_responses_websocket(emulator_server: TestServer, emulator: Emulator) -> None:
    url = f"{endpoint(emulator_server)}/openai/v1/responses"
    create = {"type": "response.create", "model": "gpt-4o", "store": False, "input": "ping"}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {AZURE_KEY}"}) as session,
        session.ws_connect(url) as socket,
    ):
        await socket.send_json(create)
        events = await receive_until(socket, "response.completed")
        assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == "Hello from the Azure OpenAI emulator. You said: ping"
        first = events[-1]["response"]
        assert (first["model"], first["store"]) == ("gpt-4o-2024-08-06", False)
        follow = {"type": "response.create", "response": {"model": "gpt-4o", "input": "again"}}
        await socket.send_json(follow | {"previous_response_id": first["id"]})
        done = (await receive_until(socket, "response.completed"))[-1]["response"]
        assert done["previous_response_id"] == first["id"]
        await socket.send_json(create | {"previous_response_id": "resp_gone"})
        error = await socket.receive_json(timeout=5)
        assert error == {
            "type": "error",
            "status": 404,
            "error": {
                "type": "invalid_request_error",
                "code": "previous_response_not_found",
                "message": "Previous response with id 'resp_gone' not found.",
                "param": "previous_response_id",
            },
        }
        await socket.send_json(create | {"model": "text-embedding-3-small"})
        assert (await socket.receive_json(timeout=5))["error"]["code"] == "OperationNotSupported"
        await socket.send_json({"type": "response.cancel"})
        assert (await socket.receive_json(timeout=5))["error"]["code"] == "invalid_event"
    assert emulator.received[0].path == "/openai/v1/responses"
    assert emulator.received[0].method == "GET"
    assert [json.loads(frame)["type"] for frame in emulator.response_frames] == ["response.create"] * 4 + [
        "response.cancel"
    ]
    assert first["id"] not in emulator.responses.responses  # store: false


async def test_responses_websocket_runs_one_response_at_a_time(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    emulator.stream_gate = asyncio.Event()
    create = {"type": "response.create", "model": "gpt-4o", "input": "ping"}
    async with http.ws_connect(f"{endpoint(emulator_server)}/openai/v1/responses") as socket:
        await socket.send_json(create)
        await receive_until(socket, "response.output_text.delta")
        await socket.send_json(create)
        error = await socket.receive_json(timeout=5)
        assert (error["type"], error["error"]["code"]) == ("error", "response_in_progress")
        emulator.stream_gate.set()
        events = await receive_until(socket, "response.completed")
        assert "error" not in [e["type"] for e in events]
        await socket.send_json(create)
        await receive_until(socket, "response.completed")


async def test_responses_websocket_max_age(emulator: Emulator, emulator_server: TestServer) -> None:
    emulator.responses_socket_max_age = 0.2
    async with (
        aiohttp.ClientSession(headers={"api-key": AZURE_KEY}) as session,
        session.ws_connect(f"{endpoint(emulator_server)}/openai/v1/responses") as socket,
    ):
        error = await socket.receive_json(timeout=5)
        assert error["error"]["code"] == "websocket_connection_limit_reached"
        closing = await socket.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert socket.close_code == 1000


@pytest.mark.parametrize(
    ("headers", "params", "status"),
    [({}, {}, 401), ({"api-key": AZURE_KEY}, {"api-version": PREVIEW}, 400)],
)
async def test_responses_websocket_refused_before_upgrade(
    emulator_server: TestServer, headers: dict[str, str], params: dict[str, str], status: int
) -> None:
    async with aiohttp.ClientSession(headers=headers) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{endpoint(emulator_server)}/openai/v1/responses", params=params)
    assert refused.value.status == status


async def test_get_on_responses_without_upgrade_is_not_found(
    emulator_server: TestServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{endpoint(emulator_server)}/openai/v1/responses") as response:
        assert response.status == 404


# 6. realtime on v1


@pytest.mark.parametrize("headers", [{"api-key": AZURE_KEY}, {"Authorization": f"Bearer {AZURE_KEY}"}])
async def test_realtime_on_v1_without_api_version(
    emulator_server: TestServer, emulator: Emulator, headers: dict[str, str]
) -> None:
    url = f"{endpoint(emulator_server)}/openai/v1/realtime"
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.ws_connect(url, params={"model": "gpt-4o-realtime-preview"}) as socket,
    ):
        assert (await socket.receive_json(timeout=5))["type"] == "session.created"
    assert emulator.last.query == {"model": "gpt-4o-realtime-preview"}
    async with aiohttp.ClientSession(headers=headers) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, params={"model": "gpt-4o-realtime-preview", "api-version": PREVIEW})
        assert refused.value.status == 400
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, params={"model": "gpt-4o"})
        assert refused.value.status == 400


# 7. the WebRTC set-up


async def client_secret(http: aiohttp.ClientSession, base: str, **session: Any) -> dict[str, Any]:
    body = {"session": {"type": "realtime", "model": "gpt-4o-realtime-preview"} | session}
    async with http.post(f"{base}/openai/v1/realtime/client_secrets", json=body) as response:
        assert response.status == 200
        secret: dict[str, Any] = await response.json()
        return secret


async def test_webrtc_client_secret_then_sdp_offer(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    base = endpoint(emulator_server)
    secret = await client_secret(http, base, instructions="Be brief.")
    assert secret["value"].startswith("ek_")
    assert secret["session"]["model"] == "gpt-4o-realtime-preview"
    assert secret["session"]["instructions"] == "Be brief."
    assert emulator.last.json()["session"]["instructions"] == "Be brief."
    async with (
        aiohttp.ClientSession() as browser,
        browser.post(
            f"{base}/openai/v1/realtime/calls",
            data=OFFER.encode(),
            headers={"Authorization": f"Bearer {secret['value']}", "Content-Type": "application/sdp"},
        ) as response,
    ):
        assert response.status == 201
        assert response.content_type == "application/sdp"
        answer = await response.text()
        location = response.headers["Location"]
    assert answer.startswith("v=0\r\n")
    assert location.startswith("/openai/v1/realtime/calls/rtc_")
    assert emulator.last.body == OFFER.encode()
    assert emulator.last.headers["Content-Type"] == "application/sdp"
    call = emulator.realtime_calls.calls[location.rsplit("/", 1)[1]]
    assert (call["deployment"], call["offer"]) == ("gpt-4o-realtime-preview", OFFER)


async def test_webrtc_call_with_the_sdk_multipart_and_model_query(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    base = endpoint(emulator_server)
    async with openai.AsyncOpenAI(base_url=f"{base}/openai/v1/", api_key=AZURE_KEY, max_retries=0) as client:
        secret = await client.realtime.client_secrets.create(
            session={"type": "realtime", "model": "gpt-4o-realtime-preview"}
        )
        assert secret.value.startswith("ek_")
    async with openai.AsyncOpenAI(
        base_url=f"{base}/openai/v1/", api_key=secret.value, max_retries=0
    ) as browser:
        raw = await browser.realtime.calls.with_raw_response.create(
            sdp=OFFER,
            session={"type": "realtime", "instructions": "Hi."},
            extra_query={"model": "gpt-4o-realtime-preview"},
        )
    assert raw.status_code == 201
    assert raw.headers["location"].startswith("/openai/v1/realtime/calls/rtc_")
    assert emulator.last.query["model"] == "gpt-4o-realtime-preview"
    form = emulator.last.form()
    sent = form.files["sdp"].content.decode() if "sdp" in form.files else form.fields["sdp"]
    assert sent == OFFER
    call = emulator.realtime_calls.calls[raw.headers["location"].rsplit("/", 1)[1]]
    assert call["session"]["instructions"] == "Hi."


async def test_webrtc_refusals(emulator_server: TestServer, http: aiohttp.ClientSession) -> None:
    base = endpoint(emulator_server)
    calls = f"{base}/openai/v1/realtime/calls"
    sdp = {"Content-Type": "application/sdp"}
    async with aiohttp.ClientSession() as anonymous:
        for token in ("ek_forged", "not-a-key"):
            async with anonymous.post(
                calls, data=OFFER, headers=sdp | {"Authorization": f"Bearer {token}"}
            ) as response:
                assert response.status == 401
    async with http.post(calls, data=OFFER, headers=sdp) as response:
        assert response.status == 404  # the resource key names no deployment: no ?model=, no ephemeral key
    async with http.post(
        calls, params={"model": "gpt-4o-realtime-preview"}, data="hello", headers=sdp
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "sdp"
    async with http.post(
        calls, params={"model": "gpt-4o-realtime-preview"}, data=OFFER, headers=sdp
    ) as response:
        assert response.status == 201
    body = {"session": {"type": "realtime", "model": "gpt-4o"}}
    async with http.post(f"{base}/openai/v1/realtime/client_secrets", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "OperationNotSupported"


async def test_ephemeral_keys_expire(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    base = endpoint(emulator_server)
    secret = await client_secret(http, base)
    key = emulator.realtime_calls.keys[secret["value"]]
    emulator.realtime_calls.keys[secret["value"]] = type(key)(key.deployment, 0)
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {secret['value']}"}
    async with (
        aiohttp.ClientSession() as browser,
        browser.post(f"{base}/openai/v1/realtime/calls", data=OFFER, headers=headers) as r,
    ):
        assert r.status == 401
