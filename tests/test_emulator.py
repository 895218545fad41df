"""The Azure OpenAI emulator on its own, driven by the official SDK's Azure and v1 clients and by raw HTTP."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from azproxy.emulator import Emulator

from .conftest import AZURE_KEY, ServerFactory

PREVIEW = "2025-04-01-preview"
GA = "2024-10-21"
ENTRA_TOKEN = "entra-token-for-tests"
#: The SDK marks the Assistants API (and audio translations) deprecated; Azure still serves them.
SDK_DEPRECATED = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
MASK = b"\x89PNG\r\n\x1a\nmask" + bytes(range(255, -1, -1))


def wav(samples: int = 1600) -> bytes:
    """A short 16 kHz mono WAV, built in memory."""
    data = b"\x00\x01" * samples
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, 16000, 32000, 2, 16)
    return (
        struct.pack("<4sI4s", b"RIFF", 36 + len(data), b"WAVE")
        + fmt
        + struct.pack("<4sI", b"data", len(data))
        + data
    )


def endpoint(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


@pytest.fixture
async def azure(emulator_server: TestServer) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint(emulator_server), api_key=AZURE_KEY, api_version=PREVIEW, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def v1(emulator_server: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The plain OpenAI client on Azure's v1 surface, the resource key sent as a bearer as Azure's docs show."""
    async with openai.AsyncOpenAI(
        base_url=f"{endpoint(emulator_server)}/openai/v1/", api_key=AZURE_KEY, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"api-key": AZURE_KEY}) as session:
        yield session


async def status_and_json(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


# deployment-scoped: images and audio


async def test_image_generation(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    answer = await azure.images.generate(model="dall-e-3", prompt="a red fox", n=2)
    assert answer.data is not None
    assert len(answer.data) == 2
    image = answer.data[0].model_dump()
    assert image["url"].startswith("https://")
    assert image["revised_prompt"] == "An emulated image of: a red fox"
    assert image["content_filter_results"]["violence"] == {"filtered": False, "severity": "safe"}
    assert emulator.last.path == "/openai/deployments/dall-e-3/images/generations"
    assert emulator.last.query["api-version"] == PREVIEW

    answer = await azure.images.generate(model="dall-e-3", prompt="x", response_format="b64_json")
    assert answer.data is not None
    assert answer.data[0].b64_json


async def test_image_edit_parts_arrive_intact(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    answer = await azure.images.edit(
        model="dall-e-3",
        image=("fox.png", PNG, "image/png"),
        mask=("mask.png", MASK, "image/png"),
        prompt="add a hat",
    )
    assert answer.data is not None
    assert answer.data[0].revised_prompt == "An emulated image of: add a hat"
    call = emulator.last
    assert call.path == "/openai/deployments/dall-e-3/images/edits"
    form = call.form()
    assert form.fields["prompt"] == "add a hat"
    assert form.fields["model"] == "dall-e-3"
    assert form.files["image"] == ("fox.png", "image/png", PNG)
    assert form.files["mask"].content == MASK


async def test_image_variations_classic_and_v1(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    """The SDK deprecated variations, so a raw form: the deployment in the path, or (v1) in the `model` field."""
    for path, fields in (
        ("/openai/deployments/dall-e-3/images/variations", {"response_format": "b64_json"}),
        ("/openai/v1/images/variations", {"model": "dall-e-3"}),
    ):
        form = aiohttp.FormData(fields)
        form.add_field("image", PNG, filename="fox.png", content_type="image/png")
        query = {} if "/v1/" in path else {"api-version": PREVIEW}
        status, answer = await status_and_json(
            http, "POST", endpoint(emulator_server) + path, params=query, data=form
        )
        assert status == 200
        assert (
            answer["data"][0]["revised_prompt"] == "An emulated image of: a variation of the uploaded image"
        )
        assert emulator.last.form().files["image"] == ("fox.png", "image/png", PNG)
    assert emulator.received[0].path.endswith("/dall-e-3/images/variations")


@SDK_DEPRECATED
async def test_audio_transcription_and_translation(
    azure: openai.AsyncAzureOpenAI, emulator: Emulator
) -> None:
    audio = wav()
    text = await azure.audio.transcriptions.create(model="whisper", file=("hello.wav", audio, "audio/wav"))
    assert text.text == f"Emulated transcription of hello.wav ({len(audio)} bytes)."
    call = emulator.last
    assert call.path == "/openai/deployments/whisper/audio/transcriptions"
    assert call.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    form = call.form()
    assert form.fields["model"] == "whisper"
    assert form.files["file"] == ("hello.wav", "audio/wav", audio)

    plain = await azure.audio.transcriptions.create(
        model="whisper", file=("hello.wav", audio), response_format="text"
    )
    assert plain.strip().startswith("Emulated transcription")
    verbose = await azure.audio.transcriptions.create(
        model="whisper", file=("hello.wav", audio), response_format="verbose_json"
    )
    assert verbose.segments is not None
    assert verbose.segments[0].text == verbose.text
    vtt = await azure.audio.transcriptions.create(
        model="whisper", file=("a.wav", audio), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT")
    srt = await azure.audio.translations.create(model="whisper", file=("a.wav", audio), response_format="srt")
    assert srt.startswith("1\n00:00:00,000 --> ")
    assert "translation into English" in srt
    assert emulator.last.path == "/openai/deployments/whisper/audio/translations"


async def test_speech_streams_audio_bytes(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    async with azure.audio.speech.with_streaming_response.create(
        model="tts", voice="alloy", input="Hello there", response_format="wav"
    ) as response:
        assert response.headers["Content-Type"] == "audio/wav"
        audio = await response.read()
    assert audio.startswith(b"RIFF")
    assert audio[8:12] == b"WAVE"
    assert emulator.chunks_sent == 4
    assert emulator.streams_finished == 1
    assert emulator.last.json() == {
        "model": "tts",
        "voice": "alloy",
        "input": "Hello there",
        "response_format": "wav",
    }

    mp3 = await azure.audio.speech.create(model="tts", voice="nova", input="hi")
    assert mp3.response.headers["Content-Type"] == "audio/mpeg"
    assert (await mp3.aread()).startswith(b"ID3")


async def test_deployment_kinds_limit_operations(azure: openai.AsyncAzureOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await azure.chat.completions.create(model="whisper", messages=[{"role": "user", "content": "x"}])
    assert refused.value.code == "OperationNotSupported"
    with pytest.raises(openai.BadRequestError) as refused:
        await azure.audio.speech.create(model="dall-e-3", voice="alloy", input="x")
    assert refused.value.code == "OperationNotSupported"
    with pytest.raises(openai.NotFoundError) as missing:
        await azure.images.generate(model="dall-e-2", prompt="x")
    assert missing.value.code == "DeploymentNotFound"


# resource-scoped: files, batches, fine-tuning, models, deployments


async def test_files_round_trip(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    content = b'{"messages": []}\n' * 3
    uploaded = await azure.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert uploaded.id.startswith("file-")
    assert uploaded.bytes == len(content)
    call = emulator.last
    assert call.path == "/openai/files"
    assert call.form().fields["purpose"] == "fine-tune"
    assert call.form().files["file"].content == content

    assert [f.id async for f in azure.files.list()] == [uploaded.id]
    assert (await azure.files.retrieve(uploaded.id)).filename == "train.jsonl"
    assert (await azure.files.content(uploaded.id)).content == content
    assert (await azure.files.delete(uploaded.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await azure.files.retrieve(uploaded.id)


async def test_batch_runs_its_input_file(azure: openai.AsyncAzureOpenAI) -> None:
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        },
        {
            "custom_id": "b",
            "method": "POST",
            "url": "/chat/completions",
            "body": {"model": "gpt-4", "messages": []},
        },
    ]
    source = await azure.files.create(
        file=("in.jsonl", "\n".join(json.dumps(line) for line in lines).encode()), purpose="batch"
    )
    batch = await azure.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    assert (await azure.batches.retrieve(batch.id)).status == "in_progress"
    done = await azure.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    assert done.output_file_id
    assert done.error_file_id
    output = json.loads((await azure.files.content(done.output_file_id)).content)
    assert output["custom_id"] == "a"
    assert output["response"]["body"]["model"] == "gpt-4o-2024-08-06"
    error = json.loads((await azure.files.content(done.error_file_id)).content)
    assert error["error"]["code"] == "DeploymentNotFound"

    other = await azure.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (await azure.batches.cancel(other.id)).status == "cancelling"
    assert (await azure.batches.retrieve(other.id)).status == "cancelled"
    assert {b.id async for b in azure.batches.list()} == {batch.id, other.id}


async def test_fine_tuning_job_lifecycle(azure: openai.AsyncAzureOpenAI) -> None:
    training = await azure.files.create(file=("t.jsonl", b"{}\n"), purpose="fine-tune")
    job = await azure.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=training.id)
    assert job.id.startswith("ftjob-")
    assert job.model_dump()["status"] == "pending"  # Azure's first status; OpenAI's is validating_files
    assert (await azure.fine_tuning.jobs.retrieve(job.id)).status == "running"
    done = await azure.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == f"gpt-4o-mini-2024-07-18.ft-{job.id.removeprefix('ftjob-')}"
    events = [e.message async for e in azure.fine_tuning.jobs.list_events(job.id)]
    assert events == ["Job succeeded.", "Job started.", "Job enqueued. Waiting for jobs ahead to complete."]
    checkpoints = [c async for c in azure.fine_tuning.jobs.checkpoints.list(job.id)]
    assert checkpoints[0].fine_tuned_model_checkpoint.endswith(":ckpt-step-10")
    with pytest.raises(openai.BadRequestError):
        await azure.fine_tuning.jobs.cancel(job.id)

    other = await azure.fine_tuning.jobs.create(model="any-base-model", training_file=training.id)
    assert (await azure.fine_tuning.jobs.cancel(other.id)).status == "cancelled"
    assert len([j async for j in azure.fine_tuning.jobs.list()]) == 2


async def test_models_list_base_models(azure: openai.AsyncAzureOpenAI) -> None:
    models = [m.id async for m in azure.models.list()]
    assert "gpt-4o-2024-08-06" in models
    assert "gpt-4o" not in models  # a deployment name, not a model
    model = await azure.models.retrieve("text-embedding-3-small")
    assert model.model_dump()["capabilities"]["embeddings"] is True
    with pytest.raises(openai.NotFoundError):
        await azure.models.retrieve("no-such-model")


async def test_deployments_listing_only_on_2022_12_01(
    emulator_server: TestServer, http: aiohttp.ClientSession
) -> None:
    url = f"{endpoint(emulator_server)}/openai/deployments"
    status, listing = await status_and_json(http, "GET", url, params={"api-version": "2022-12-01"})
    assert status == 200
    assert listing["object"] == "list"
    gpt4o = next(d for d in listing["data"] if d["id"] == "gpt-4o")
    assert (gpt4o["model"], gpt4o["object"], gpt4o["status"]) == (
        "gpt-4o-2024-08-06",
        "deployment",
        "succeeded",
    )
    status, error = await status_and_json(http, "GET", url, params={"api-version": GA})
    assert (status, error) == (404, {"error": {"code": "404", "message": "Resource not found"}})


# assistants, threads, runs, vector stores


@SDK_DEPRECATED
async def test_assistants_threads_and_runs(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    assistant = await azure.beta.assistants.create(model="gpt-4o", name="guide", instructions="Be brief.")
    assert emulator.last.path == "/openai/assistants"
    assert emulator.last.headers["OpenAI-Beta"] == "assistants=v2"
    assert (await azure.beta.assistants.retrieve(assistant.id)).name == "guide"
    assert (await azure.beta.assistants.update(assistant.id, name="renamed")).name == "renamed"
    assert [a.id async for a in azure.beta.assistants.list()] == [assistant.id]

    thread = await azure.beta.threads.create(messages=[{"role": "user", "content": "first"}])
    message = await azure.beta.threads.messages.create(thread.id, role="user", content="second question")
    assert (await azure.beta.threads.messages.retrieve(message.id, thread_id=thread.id)).id == message.id

    run = await azure.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    assert (run.status, run.model) == ("queued", "gpt-4o")
    run = await azure.beta.threads.runs.retrieve(run.id, thread_id=thread.id)
    assert run.status == "completed"
    assert run.usage is not None
    newest = await anext(m async for m in azure.beta.threads.messages.list(thread.id))
    assert newest.role == "assistant"
    assert newest.content[0].type == "text"
    assert newest.content[0].text.value == "Hello from the Azure OpenAI emulator. You said: second question"
    steps = [s async for s in azure.beta.threads.runs.steps.list(run.id, thread_id=thread.id)]
    assert steps[0].step_details.type == "message_creation"
    assert [r.id async for r in azure.beta.threads.runs.list(thread.id)] == [run.id]
    with pytest.raises(openai.BadRequestError):
        await azure.beta.threads.runs.cancel(run.id, thread_id=thread.id)

    queued = await azure.beta.threads.runs.create(thread.id, assistant_id=assistant.id)
    assert (await azure.beta.threads.runs.cancel(queued.id, thread_id=thread.id)).status == "cancelling"
    assert (await azure.beta.threads.runs.retrieve(queued.id, thread_id=thread.id)).status == "cancelled"

    assert (await azure.beta.threads.delete(thread.id)).deleted is True
    assert (await azure.beta.assistants.delete(assistant.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await azure.beta.assistants.retrieve(assistant.id)


@SDK_DEPRECATED
async def test_streamed_run_sends_assistants_events(
    azure: openai.AsyncAzureOpenAI, emulator_server: TestServer, http: aiohttp.ClientSession
) -> None:
    assistant = await azure.beta.assistants.create(model="gpt-4o-mini")
    thread = await azure.beta.threads.create(messages=[{"role": "user", "content": "stream me"}])
    stream = await azure.beta.threads.runs.create(thread.id, assistant_id=assistant.id, stream=True)
    events = [event async for event in stream]
    names = [event.event for event in events]
    assert names[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert names[-1] == "thread.run.completed"
    text = "".join(
        block.text.value or ""
        for event in events
        if event.event == "thread.message.delta"
        for block in event.data.delta.content or []
        if block.type == "text" and block.text is not None
    )
    assert text == "Hello from the Azure OpenAI emulator. You said: stream me"

    url = f"{endpoint(emulator_server)}/openai/threads/runs"
    body = {
        "assistant_id": assistant.id,
        "stream": True,
        "thread": {"messages": [{"role": "user", "content": "x"}]},
    }
    async with http.post(url, params={"api-version": PREVIEW}, json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = await response.read()
    events_sent = raw.decode().split("\n\n")
    assert events_sent[0].startswith("event: thread.run.created\ndata: {")
    assert events_sent[-3].startswith("event: thread.run.completed\ndata: {")
    assert events_sent[-2:] == ["event: done\ndata: [DONE]", ""]


@SDK_DEPRECATED
async def test_create_thread_and_run(azure: openai.AsyncAzureOpenAI) -> None:
    assistant = await azure.beta.assistants.create(model="gpt-4o")
    run = await azure.beta.threads.create_and_run(
        assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "hey"}]}
    )
    assert run.status == "queued"
    assert (await azure.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)).status == "completed"


async def test_vector_stores(azure: openai.AsyncAzureOpenAI) -> None:
    files = [await azure.files.create(file=(f"{i}.txt", b"text"), purpose="assistants") for i in range(3)]
    store = await azure.vector_stores.create(name="docs", file_ids=[files[0].id])
    assert store.id.startswith("vs_")
    assert store.file_counts.completed == 1
    assert (await azure.vector_stores.update(store.id, name="renamed")).name == "renamed"
    assert [s.id async for s in azure.vector_stores.list()] == [store.id]

    added = await azure.vector_stores.files.create(store.id, file_id=files[1].id)
    assert added.status == "completed"
    assert (await azure.vector_stores.files.retrieve(files[1].id, vector_store_id=store.id)).id == files[1].id
    assert {f.id async for f in azure.vector_stores.files.list(store.id)} == {files[0].id, files[1].id}
    assert (await azure.vector_stores.files.delete(files[1].id, vector_store_id=store.id)).deleted is True

    batch = await azure.vector_stores.file_batches.create(store.id, file_ids=[files[2].id])
    assert batch.status == "in_progress"
    assert (
        await azure.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id)
    ).status == "completed"
    listed = [
        f.id async for f in azure.vector_stores.file_batches.list_files(batch.id, vector_store_id=store.id)
    ]
    assert listed == [files[2].id]
    other = await azure.vector_stores.file_batches.create(store.id, file_ids=[files[0].id])
    assert (
        await azure.vector_stores.file_batches.cancel(other.id, vector_store_id=store.id)
    ).status == "cancelled"
    assert (await azure.vector_stores.retrieve(store.id)).file_counts.total == 2
    assert (await azure.vector_stores.delete(store.id)).deleted is True


# responses


async def test_responses_plain(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    response = await azure.responses.create(model="gpt-4o", input="ping", instructions="Be kind.")
    assert response.output_text == "Hello from the Azure OpenAI emulator. You said: ping"
    assert response.model == "gpt-4o-2024-08-06"
    assert response.usage is not None
    assert emulator.last.path == "/openai/responses"
    assert emulator.last.json()["model"] == "gpt-4o"
    assert (await azure.responses.retrieve(response.id)).output_text == response.output_text
    items = [item async for item in azure.responses.input_items.list(response.id)]
    assert (
        items[0].model_dump()["content"][0] | {"type": "input_text", "text": "ping"}
        == items[0].model_dump()["content"][0]
    )
    await azure.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await azure.responses.retrieve(response.id)


async def test_responses_streamed(azure: openai.AsyncAzureOpenAI, emulator: Emulator) -> None:
    stream = await azure.responses.create(
        model="gpt-4.1-mini", input=[{"role": "user", "content": "one two"}], stream=True
    )
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "Hello from the Azure OpenAI emulator. You said: one two"
    assert emulator.streams_finished == 1


# api-version rules, v1, Entra ID, DeploymentNotFound in bodies


@pytest.mark.parametrize(
    ("path", "version", "status"),
    [
        ("/openai/assistants", GA, 404),
        ("/openai/assistants", "2024-08-01-preview", 200),
        ("/openai/threads/thread_x", GA, 404),
        ("/openai/vector_stores", GA, 404),
        ("/openai/responses/resp_x", "2025-01-01-preview", 404),
        ("/openai/responses/resp_x", "2025-03-01-preview", 404),  # reached: the response does not exist
        ("/openai/batches", "2024-06-01", 404),
        ("/openai/batches", GA, 200),
        ("/openai/fine_tuning/jobs", "2023-05-15", 404),
        ("/openai/fine_tuning/jobs", "2024-02-01", 200),
        ("/openai/files", "2023-05-15", 200),
        ("/openai/models", "2023-03-15-preview", 404),
        ("/openai/models", GA, 200),
    ],
)
async def test_api_version_minimums(
    emulator_server: TestServer, http: aiohttp.ClientSession, path: str, version: str, status: int
) -> None:
    got, body = await status_and_json(
        http, "GET", endpoint(emulator_server) + path, params={"api-version": version}
    )
    assert got == status
    if status == 404 and "_x" not in path:
        assert body == {"error": {"code": "404", "message": "Resource not found"}}


@SDK_DEPRECATED
async def test_preview_only_operations_with_ga_client(emulator_server: TestServer) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint(emulator_server), api_key=AZURE_KEY, api_version=GA, max_retries=0
    ) as client:
        with pytest.raises(openai.NotFoundError, match="Resource not found"):
            await client.beta.assistants.create(model="gpt-4o")
        with pytest.raises(openai.NotFoundError, match="Resource not found"):
            await client.responses.create(model="gpt-4o", input="x")
        with pytest.raises(openai.NotFoundError, match="Resource not found"):
            await client.images.edit(model="dall-e-3", image=("a.png", PNG), prompt="x")
        await client.images.generate(model="dall-e-3", prompt="x")


async def test_v1_surface(v1: openai.AsyncOpenAI, emulator: Emulator) -> None:
    answer = await v1.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "v1"}])
    assert answer.choices[0].message.content == "Hello from the Azure OpenAI emulator. You said: v1"
    assert answer.model == "gpt-4o-2024-08-06"
    call = emulator.last
    assert call.path == "/openai/v1/chat/completions"
    assert "api-version" not in call.query
    assert call.headers["Authorization"] == f"Bearer {AZURE_KEY}"

    audio = wav(100)
    text = await v1.audio.transcriptions.create(model="whisper", file=("v1.wav", audio, "audio/wav"))
    assert text.text.startswith("Emulated transcription of v1.wav")
    assert emulator.last.path == "/openai/v1/audio/transcriptions"
    assert emulator.last.form().fields["model"] == "whisper"

    response = await v1.responses.create(model="gpt-4o-mini", input="x")
    assert emulator.last.path == "/openai/v1/responses"
    assert (await v1.responses.retrieve(response.id)).id == response.id
    uploaded = await v1.files.create(file=("v1.jsonl", b"{}"), purpose="batch")
    assert [f.id async for f in v1.files.list()] == [uploaded.id]
    assert emulator.last.path == "/openai/v1/files"
    assert [m.id async for m in v1.models.list()]

    with pytest.raises(openai.NotFoundError) as missing:
        await v1.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "DeploymentNotFound"
    with pytest.raises(openai.NotFoundError) as missing:
        await v1.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio))
    assert missing.value.code == "DeploymentNotFound"


@pytest.mark.parametrize(
    ("query", "status"),
    [({}, 200), ({"api-version": "preview"}, 200), ({"api-version": "v1"}, 200), ({"api-version": GA}, 400)],
)
async def test_v1_api_versions_and_api_key_header(
    emulator_server: TestServer, emulator: Emulator, query: dict[str, str], status: int
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{endpoint(emulator_server)}/openai/v1/",
        api_key="unused",
        default_headers={"Authorization": "", "api-key": AZURE_KEY},  # a blank bearer counts as none
        default_query=query,
        max_retries=0,
    ) as client:
        try:
            await client.embeddings.create(model="text-embedding-3-small", input="x")
            got = 200
        except openai.BadRequestError:
            got = 400
    assert got == status
    assert emulator.last.headers["api-key"] == AZURE_KEY


@pytest.fixture
async def entra_server(start_server: ServerFactory) -> TestServer:
    return await start_server(Emulator(api_keys={AZURE_KEY}, entra_tokens={ENTRA_TOKEN}).app())


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Bearer {ENTRA_TOKEN}"}, 200),
        ({"Authorization": f"Bearer {ENTRA_TOKEN}", "api-key": AZURE_KEY}, 200),
        ({"Authorization": "Bearer unknown-token"}, 401),
        ({"Authorization": "Bearer unknown-token", "api-key": AZURE_KEY}, 401),
        ({"Authorization": f"Bearer {AZURE_KEY}"}, 401),  # classic reads every bearer as an Entra token
        ({"api-key": AZURE_KEY}, 200),
        ({"api-key": "wrong"}, 401),
    ],
)
async def test_entra_tokens(entra_server: TestServer, headers: dict[str, str], status: int) -> None:
    url = f"{endpoint(entra_server)}/openai/deployments/gpt-4o/chat/completions"
    body = {"messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as session:
        got, answer = await status_and_json(
            session, "POST", url, params={"api-version": GA}, json=body, headers=headers
        )
    assert got == status
    if status == 401:
        assert answer["error"]["code"] == "401"


async def test_entra_token_with_the_sdk(entra_server: TestServer) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=endpoint(entra_server), azure_ad_token=ENTRA_TOKEN, api_version=GA, max_retries=0
    ) as client:
        answer = await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert len(answer.data[0].embedding) == 16


@SDK_DEPRECATED
async def test_bodies_naming_a_model_must_name_a_deployment(azure: openai.AsyncAzureOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        await azure.responses.create(model="gpt-4", input="x")
    assert missing.value.code == "DeploymentNotFound"
    with pytest.raises(openai.NotFoundError) as missing:
        await azure.beta.assistants.create(model="gpt-4o-2024-08-06")
    assert missing.value.code == "DeploymentNotFound"
    assistant = await azure.beta.assistants.create(model="gpt-4o")
    thread = await azure.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as missing:
        await azure.beta.threads.runs.create(thread.id, assistant_id=assistant.id, model="gpt-4-turbo")
    assert missing.value.code == "DeploymentNotFound"
    with pytest.raises(openai.NotFoundError):
        await azure.beta.threads.create_and_run(assistant_id=assistant.id, model="nope")
    with pytest.raises(openai.BadRequestError) as refused:
        await azure.responses.create(model="text-embedding-3-small", input="x")
    assert refused.value.code == "OperationNotSupported"


# realtime


async def test_realtime_echo(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    url = f"{endpoint(emulator_server)}/openai/realtime"
    params = {"api-version": PREVIEW, "deployment": "gpt-4o-realtime-preview"}
    async with http.ws_connect(url, params=params) as socket:
        created = await socket.receive_json()
        assert created["type"] == "session.created"
        assert created["session"]["model"] == "gpt-4o-realtime-preview-2024-12-17"
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "over"}]}
        await socket.send_json({"type": "conversation.item.create", "item": item})
        assert (await socket.receive_json())["type"] == "conversation.item.created"
        await socket.send_json({"type": "response.create"})
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "response.done":
            events.append(await socket.receive_json())
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.text.delta")
        assert deltas == "Hello from the Azure OpenAI emulator. You said: over"
        await socket.send_str("not json")
        assert (await socket.receive_json())["error"]["code"] == "invalid_json"
        await socket.send_json({"type": "no.such.event", "event_id": "e1"})
        error = (await socket.receive_json())["error"]
        assert (error["code"], error["event_id"]) == ("invalid_value", "e1")
    assert len(emulator.realtime_frames) == 4
    assert json.loads(emulator.realtime_frames[0])["type"] == "conversation.item.create"
    assert emulator.received[-1].path == "/openai/realtime"


async def test_realtime_ga_with_key_in_query(start_server: ServerFactory) -> None:
    """Browsers put the key in the URL, which access logs keep: a throwaway key, not one the run guards."""
    server = await start_server(Emulator(api_keys={"browser-key"}).app())
    url = f"{endpoint(server)}/openai/v1/realtime"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(
            url, params={"model": "gpt-4o-realtime-preview", "api-key": "browser-key"}
        ) as socket,
    ):
        assert (await socket.receive_json())["type"] == "session.created"
        await socket.send_json({"type": "response.create"})
        kinds = set()
        while "response.done" not in kinds:
            kinds.add((await socket.receive_json())["type"])
        assert "response.output_text.delta" in kinds


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"api-version": PREVIEW, "deployment": "gpt-4o-realtime"}, 404),
        ({"api-version": PREVIEW, "deployment": "gpt-4o"}, 400),
        ({"api-version": GA, "deployment": "gpt-4o-realtime-preview"}, 404),
        ({"api-version": PREVIEW, "deployment": "gpt-4o-realtime-preview", "api-key": "wrong"}, 401),
        ({"api-version": PREVIEW, "deployment": "gpt-4o-realtime-preview"}, 401),
    ],
)
async def test_realtime_refused_before_upgrade(
    emulator_server: TestServer, emulator: Emulator, params: dict[str, str], status: int
) -> None:
    headers = {"api-key": AZURE_KEY} if status != 401 else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{endpoint(emulator_server)}/openai/realtime", params=params)
    assert refused.value.status == status
    assert emulator.last.path == "/openai/realtime"


# recording, and ReceivedRequest.form()


async def test_every_request_is_recorded_and_forms_must_be_well_formed(
    emulator_server: TestServer, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    url = f"{endpoint(emulator_server)}/openai/v1/audio/transcriptions"
    broken = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nabc'
    status, body = await status_and_json(
        http,
        "POST",
        url,
        data=io.BytesIO(broken),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert status == 400
    assert body["error"]["code"] == "BadRequest"
    assert emulator.last.body == broken
    with pytest.raises(ValueError, match="multipart"):
        emulator.last.form()
    await status_and_json(http, "GET", f"{endpoint(emulator_server)}/openai/v1/models")
    await status_and_json(http, "GET", f"{endpoint(emulator_server)}/nowhere")
    assert [r.path for r in emulator.received] == [
        "/openai/v1/audio/transcriptions",
        "/openai/v1/models",
        "/nowhere",
    ]
