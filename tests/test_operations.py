"""Every OpenAI operation Azure serves, through azproxy with the official SDK, asserting what Azure received."""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from azproxy.config import load_settings
from azproxy.credentials import EntraToken
from azproxy.emulator import Emulator
from azproxy.errors import BadGateway
from azproxy.server import build_app

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory, ServerFactory

SDK_DEPRECATED = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MAPPER = "gpt-4o=gpt-4o-mini,whisper-1=whisper,tts-1=tts,gpt-image-1=dall-e-3,gpt-4o-realtime=gpt-4o-realtime-preview"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 128
GA, PREVIEW = "2024-10-21", "2025-04-01-preview"
ENTRA_TOKEN = "entra-token-for-tests"
SECRETS.add(ENTRA_TOKEN)


@pytest.fixture
async def client(make_proxy: ProxyFactory) -> Any:
    proxy = await make_proxy(AZURE_OPENAI_MODEL_MAPPER=MAPPER)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as sdk:
        yield sdk


def azure_saw(emulator: Emulator, path: str, version: str | None = GA) -> Any:
    call = emulator.last
    assert call.path == path
    assert call.query.getall("api-version", []) == ([version] if version else [])
    assert call.headers.getall("api-key") == [AZURE_KEY]
    assert "Authorization" not in call.headers
    return call


async def test_images_generate(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    image = await client.images.generate(model="gpt-image-1", prompt="a fox", n=1)
    assert image.data is not None
    call = azure_saw(emulator, "/openai/deployments/dall-e-3/images/generations")
    assert call.json() == {"model": "gpt-image-1", "prompt": "a fox", "n": 1}


@SDK_DEPRECATED
async def test_images_edit_and_variation_multipart_intact(
    client: openai.AsyncOpenAI, emulator: Emulator
) -> None:
    await client.images.edit(model="gpt-image-1", image=("fox.png", PNG, "image/png"), prompt="add a hat")
    form = azure_saw(emulator, "/openai/deployments/dall-e-3/images/edits", PREVIEW).form()
    assert form.files["image"] == ("fox.png", "image/png", PNG)
    assert (form.fields["prompt"], form.fields["model"]) == ("add a hat", "gpt-image-1")
    await client.images.create_variation(model="gpt-image-1", image=("fox.png", PNG, "image/png"))
    assert (
        azure_saw(emulator, "/openai/deployments/dall-e-3/images/variations", PREVIEW)
        .form()
        .files["image"]
        .content
        == PNG
    )


@SDK_DEPRECATED
async def test_audio_transcription_and_translation(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    text = await client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", WAV, "audio/wav"))
    assert text.text
    form = azure_saw(emulator, "/openai/deployments/whisper/audio/transcriptions").form()
    assert form.files["file"] == ("talk.wav", "audio/wav", WAV)
    assert form.fields["model"] == "whisper-1"  # classic: the deployment is in the path, the body as sent
    await client.audio.translations.create(model="whisper-1", file=("talk.wav", WAV, "audio/wav"))
    assert (
        azure_saw(emulator, "/openai/deployments/whisper/audio/translations").form().files["file"].content
        == WAV
    )


async def test_speech_streams_binary(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    speech = await client.audio.speech.create(
        model="tts-1", voice="alloy", input="hello", response_format="mp3"
    )
    audio = speech.content
    assert len(audio) > 0
    assert speech.response.headers["content-type"].startswith("audio/")
    assert azure_saw(emulator, "/openai/deployments/tts/audio/speech").json()["input"] == "hello"


async def test_files(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    content = b'{"prompt": "x"}\n' * 100
    uploaded = await client.files.create(file=("data.jsonl", content), purpose="batch")
    assert azure_saw(emulator, "/openai/files").form().files["file"].content == content
    assert [f.id async for f in client.files.list()] == [uploaded.id]
    assert (await client.files.retrieve(uploaded.id)).bytes == len(content)
    assert azure_saw(emulator, f"/openai/files/{uploaded.id}").method == "GET"
    assert (await client.files.content(uploaded.id)).content == content
    assert azure_saw(emulator, f"/openai/files/{uploaded.id}/content").method == "GET"
    assert (await client.files.delete(uploaded.id)).deleted is True
    assert azure_saw(emulator, f"/openai/files/{uploaded.id}").method == "DELETE"


async def test_batches(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    source = await client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    batch = await client.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert azure_saw(emulator, "/openai/batches").json()["input_file_id"] == source.id
    assert [b.id async for b in client.batches.list()] == [batch.id]
    await client.batches.retrieve(batch.id)
    await client.batches.cancel(batch.id)
    assert azure_saw(emulator, f"/openai/batches/{batch.id}/cancel").method == "POST"


async def test_fine_tuning_model_is_not_mapped(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    training = await client.files.create(file=("t.jsonl", b"{}\n"), purpose="fine-tune")
    job = await client.fine_tuning.jobs.create(model="gpt-4o", training_file=training.id)
    assert azure_saw(emulator, "/openai/fine_tuning/jobs").json()["model"] == "gpt-4o"  # a base model
    [e async for e in client.fine_tuning.jobs.list_events(job.id)]
    assert azure_saw(emulator, f"/openai/fine_tuning/jobs/{job.id}/events").method == "GET"
    [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
    assert azure_saw(emulator, f"/openai/fine_tuning/jobs/{job.id}/checkpoints").method == "GET"
    await client.fine_tuning.jobs.cancel(
        (await client.fine_tuning.jobs.create(model="x", training_file=training.id)).id
    )
    assert emulator.last.path.endswith("/cancel")


@SDK_DEPRECATED
async def test_assistants_threads_runs_use_deployments(
    client: openai.AsyncOpenAI, emulator: Emulator
) -> None:
    assistant = await client.beta.assistants.create(model="gpt-4o", name="guide")
    call = azure_saw(emulator, "/openai/assistants", PREVIEW)
    assert call.json() == {"model": "gpt-4o-mini", "name": "guide"}
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    azure_saw(emulator, "/openai/threads", PREVIEW)
    await client.beta.threads.messages.create(thread.id, role="user", content="more")
    azure_saw(emulator, f"/openai/threads/{thread.id}/messages", PREVIEW)
    stream = await client.beta.threads.runs.create(
        thread.id, assistant_id=assistant.id, model="gpt-4o", stream=True
    )
    kinds = [event.event async for event in stream]
    assert kinds[0] == "thread.run.created"
    assert kinds[-1] == "thread.run.completed"
    call = azure_saw(emulator, f"/openai/threads/{thread.id}/runs", PREVIEW)
    assert call.json()["model"] == "gpt-4o-mini"
    run = await client.beta.threads.create_and_run(assistant_id=assistant.id, model="gpt-4o")
    assert azure_saw(emulator, "/openai/threads/runs", PREVIEW).json()["model"] == "gpt-4o-mini"
    await client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
    await client.beta.assistants.delete(assistant.id)
    assert azure_saw(emulator, f"/openai/assistants/{assistant.id}", PREVIEW).method == "DELETE"


async def test_vector_stores(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    document = await client.files.create(file=("a.txt", b"text"), purpose="assistants")
    store = await client.vector_stores.create(name="docs")
    azure_saw(emulator, "/openai/vector_stores", PREVIEW)
    await client.vector_stores.files.create(store.id, file_id=document.id)
    azure_saw(emulator, f"/openai/vector_stores/{store.id}/files", PREVIEW)
    await client.vector_stores.file_batches.create(store.id, file_ids=[document.id])
    azure_saw(emulator, f"/openai/vector_stores/{store.id}/file_batches", PREVIEW)


async def test_responses_plain_and_streamed(client: openai.AsyncOpenAI, emulator: Emulator) -> None:
    response = await client.responses.create(model="gpt-4o", input="ping")
    assert response.output_text.endswith("You said: ping")
    assert azure_saw(emulator, "/openai/responses", PREVIEW).json() == {
        "model": "gpt-4o-mini",
        "input": "ping",
    }
    stream = await client.responses.create(model="gpt-4o", input="pong", stream=True)
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta").endswith("pong")
    assert (await client.responses.retrieve(response.id)).id == response.id
    azure_saw(emulator, f"/openai/responses/{response.id}", PREVIEW)
    [item async for item in client.responses.input_items.list(response.id)]
    azure_saw(emulator, f"/openai/responses/{response.id}/input_items", PREVIEW)
    await client.responses.delete(response.id)
    assert azure_saw(emulator, f"/openai/responses/{response.id}", PREVIEW).method == "DELETE"


async def test_model_rewrite_keeps_every_other_byte(proxy_with_mapper: Proxy, emulator: Emulator) -> None:
    sent = b'{\n  "input" : "h\\u00e9 \\"model\\": x",\t"model":"gpt-4o" , "metadata": {"model": "keep"}\n}'
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            proxy_with_mapper.url / "v1/responses",
            data=sent,
            headers={"Authorization": f"Bearer {AZURE_KEY}", "Content-Type": "application/json"},
        ) as reply,
    ):
        assert reply.status == 200
    assert emulator.last.body == sent.replace(b'"model":"gpt-4o"', b'"model":"gpt-4o-mini"')


@pytest.fixture
async def proxy_with_mapper(make_proxy: ProxyFactory) -> Proxy:
    return await make_proxy(AZURE_OPENAI_MODEL_MAPPER=MAPPER)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({}, PREVIEW),
        ({"AZURE_OPENAI_APIVERSION": "2025-03-01-preview"}, "2025-03-01-preview"),
        ({"AZPROXY_APIVERSION_OVERRIDES": "responses=2025-02-01-preview"}, "2025-02-01-preview"),
    ],
)
async def test_api_version_per_operation(
    make_proxy: ProxyFactory, emulator: Emulator, environment: dict[str, str], expected: str
) -> None:
    proxy = await make_proxy(**environment)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as sdk:
        await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        chat_version = emulator.last.query["api-version"]
        with contextlib.suppress(openai.NotFoundError):  # 2025-02-01-preview is too old for Responses:
            await sdk.responses.create(model="gpt-4o", input="x")  # what matters is what azproxy sent
        assert emulator.last.query.getall("api-version") == [expected]
        await sdk.responses.create(
            model="gpt-4o", input="x", extra_query={"api-version": "2025-03-01-preview"}
        )
        assert emulator.last.query.getall("api-version") == ["2025-03-01-preview"]  # the client's wins
    assert chat_version == environment.get("AZURE_OPENAI_APIVERSION", GA)


@SDK_DEPRECATED
async def test_v1_api_style(make_proxy: ProxyFactory, emulator: Emulator) -> None:
    proxy = await make_proxy(AZPROXY_AZURE_API="v1", AZURE_OPENAI_MODEL_MAPPER=MAPPER)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as sdk:
        await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        call = azure_saw(emulator, "/openai/v1/chat/completions", None)
        assert call.json()["model"] == "gpt-4o-mini"
        await sdk.audio.translations.create(model="whisper-1", file=("t.wav", WAV, "audio/wav"))
        form = azure_saw(emulator, "/openai/v1/audio/translations", None).form()
        assert (form.fields["model"], form.files["file"].content) == ("whisper", WAV)
        await sdk.responses.create(model="gpt-4o", input="x")
        assert azure_saw(emulator, "/openai/v1/responses", None).json()["model"] == "gpt-4o-mini"
        uploaded = await sdk.files.create(file=("d.jsonl", b"{}\n"), purpose="batch")
        await sdk.files.retrieve(uploaded.id)
        azure_saw(emulator, f"/openai/v1/files/{uploaded.id}", None)


async def test_azure_errors_in_openai_shape(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    error = missing.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["type"], error["param"]) == (
        "DeploymentNotFound",
        "invalid_request_error",
        None,
    )
    assert "AZURE_OPENAI_MODEL_MAPPER" in error["message"]
    assert "'no-such-model'" in error["message"]
    with pytest.raises(openai.BadRequestError) as filtered:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "__content_filter__"}]
        )
    error = filtered.value.body
    assert isinstance(error, dict)
    assert error["code"] == "content_filter"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True


async def test_openai_response_shape(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy(AZPROXY_RESPONSE_SHAPE="openai")
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as sdk:
        answer = await sdk.chat.completions.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x"}]
        )
        assert answer.model == "gpt-3.5-turbo"
        assert "prompt_filter_results" not in (answer.model_extra or {})
        assert "content_filter_results" not in (answer.choices[0].model_extra or {})
        stream = await sdk.chat.completions.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices  # Azure's filter-only first chunk is gone
    assert {chunk.model for chunk in chunks} == {"gpt-3.5-turbo"}
    assert chunks[-1].usage is not None


async def test_realtime_bridge_through_proxy(proxy_with_mapper: Proxy, emulator: Emulator) -> None:
    url = (proxy_with_mapper.url / "v1/realtime").with_query(model="gpt-4o-realtime")
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers={"Authorization": f"Bearer {AZURE_KEY}"}) as ws,
    ):
        created = await ws.receive_json(timeout=5)
        assert created["type"] == "session.created"
        await ws.send_json({"type": "response.create"})
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            kinds.append((await ws.receive_json(timeout=5))["type"])
    call = emulator.received[-1]
    assert call.path == "/openai/realtime"
    assert call.query["deployment"] == "gpt-4o-realtime-preview"
    assert call.query["api-version"] == PREVIEW
    assert "model" not in call.query
    assert call.headers["api-key"] == AZURE_KEY
    assert "Authorization" not in call.headers
    assert json.loads(emulator.realtime_frames[0])["type"] == "response.create"


async def test_realtime_key_in_browser_subprotocol(proxy_with_mapper: Proxy, emulator: Emulator) -> None:
    url = (proxy_with_mapper.url / "v1/realtime").with_query(model="gpt-4o-realtime")
    offered = ("realtime", f"openai-insecure-api-key.{AZURE_KEY}", "openai-beta.realtime-v1")
    async with aiohttp.ClientSession() as session, session.ws_connect(url, protocols=offered) as ws:
        assert ws.protocol == "realtime"
        assert (await ws.receive_json(timeout=5))["type"] == "session.created"
    call = emulator.received[-1]
    assert call.headers["api-key"] == AZURE_KEY
    assert AZURE_KEY not in call.headers.get("Sec-WebSocket-Protocol", "")


async def test_path_segments_cannot_climb(proxy: Proxy, emulator: Emulator) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("v1/files/..%2F..%2Fdeployments%2Fx", "v1/files/%2E%2E/x"):
            url = proxy.url.with_path("/" + path, encoded=True)
            async with session.get(url, headers={"Authorization": f"Bearer {AZURE_KEY}"}) as reply:
                assert reply.status == 400, path
                assert (await reply.json())["error"]["code"] == "invalid_path"
    assert emulator.received == []


class FakeTokenService:
    """Stands in for Azure's token service: counts fetches, hands out tokens with a given lifetime."""

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.fetches = 0
        self.fail = False

    async def get_token(self, *scopes: str) -> SimpleNamespace:
        assert scopes == ("https://cognitiveservices.azure.com/.default",)
        self.fetches += 1
        if self.fail:
            raise RuntimeError("token service down")
        return SimpleNamespace(token=ENTRA_TOKEN, expires_on=time.time() + self.lifetime)

    async def close(self) -> None:
        return None


async def test_entra_token_cached_and_refreshed() -> None:
    service = FakeTokenService(lifetime=3600)
    token = EntraToken(service, margin=300)
    assert await token.headers() == {"Authorization": f"Bearer {ENTRA_TOKEN}"}
    for _ in range(10):
        await token.headers()
    assert service.fetches == 1
    service.lifetime = 200  # the next token is within the refresh margin at once
    token._expires_on = time.time() + 250  # the cached one is about to expire: refreshed before it does
    await token.headers()
    assert service.fetches == 2
    service.fail = True
    await token.headers()  # refresh fails, the current token is still valid: used, not an error
    token._expires_on = time.time() - 1
    with pytest.raises(BadGateway):
        await token.headers()


async def test_entra_sign_in_through_proxy(
    start_server: ServerFactory, emulator: Emulator, emulator_server: TestServer
) -> None:
    emulator.entra_tokens = frozenset({ENTRA_TOKEN})
    service = FakeTokenService(lifetime=3600)
    settings = load_settings(
        {
            "AZURE_OPENAI_ENDPOINT": str(emulator_server.make_url("")).rstrip("/"),
            "AZPROXY_AUTH": "entra",
            "AZPROXY_API_KEYS": "sk-client-of-entra",
            "AZURE_OPENAI_PROXY_ADDRESS": "127.0.0.1:8080",
        }
    )
    proxy = Proxy(await start_server(build_app(settings, credential=EntraToken(service))))
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key="sk-client-of-entra", max_retries=0
    ) as sdk:
        for _ in range(3):
            await sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert service.fetches == 1
    assert {r.headers["Authorization"] for r in emulator.received} == {f"Bearer {ENTRA_TOKEN}"}
    assert all("api-key" not in r.headers for r in emulator.received)
