"""Model allowlists hold for every way a request names a model: a run's assistant, a batch file's lines,
fine-tuning's base model, JSON keys spelled with escapes and RFC 2231 form names."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from azproxy.emulator import Emulator

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory

ALICE, AUDITOR, BUILDER = "sk-allowlist-alice-0001", "sk-allowlist-auditor-02", "sk-allowlist-builder-03"
SECRETS.update({ALICE, AUDITOR, BUILDER})
SDK_DEPRECATED = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning"
)  # the SDK's Assistants API is deprecated


@pytest.fixture
async def proxy(make_proxy: ProxyFactory, tmp_path: Path) -> Proxy:
    clients = tmp_path / "clients.toml"
    clients.write_text(
        """
[[client]]
name = "alice"
key = "env:ALICE_KEY"
models = ["gpt-4o"]

[[client]]
name = "auditor"
key = "env:AUDITOR_KEY"
models = ["gpt-4o"]
shared_objects = true

[[client]]
name = "builder"
key = "env:BUILDER_KEY"
"""
    )
    return await make_proxy(
        AZURE_OPENAI_TOKEN=AZURE_KEY,
        AZPROXY_CLIENTS_FILE=str(clients),
        AZPROXY_STATE_DIR=str(tmp_path / "state"),
        ALICE_KEY=ALICE,
        AUDITOR_KEY=AUDITOR,
        BUILDER_KEY=BUILDER,
    )


def sdk(proxy: Proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


def batch_lines(*models: str) -> bytes:
    return b"\n".join(
        json.dumps(
            {"custom_id": str(i), "method": "POST", "url": "/chat/completions", "body": {"model": m}}
        ).encode()
        for i, m in enumerate(models)
    )


@SDK_DEPRECATED
async def test_a_run_is_checked_against_its_assistants_model(proxy: Proxy, emulator: Emulator) -> None:
    async with sdk(proxy, BUILDER) as builder, sdk(proxy, AUDITOR) as auditor:
        other = await builder.beta.assistants.create(model="o3-mini", name="other")
        allowed = await builder.beta.assistants.create(model="gpt-4o", name="allowed")
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await auditor.beta.threads.create_and_run(assistant_id=other.id)
        assert refused.value.code == "model_not_allowed"
        thread = await auditor.beta.threads.create()
        with pytest.raises(openai.PermissionDeniedError):
            await auditor.beta.threads.runs.create(thread_id=thread.id, assistant_id=other.id)
        run = await auditor.beta.threads.runs.create(thread_id=thread.id, assistant_id=allowed.id)
        assert run.assistant_id == allowed.id
    runs = [r for r in emulator.received if r.method == "POST" and r.path.endswith("/runs")]
    assert len(runs) == 1  # the refused runs never reached Azure


async def test_batch_files_are_checked_line_by_line(proxy: Proxy, emulator: Emulator) -> None:
    async with sdk(proxy, ALICE) as alice, sdk(proxy, BUILDER) as builder, sdk(proxy, AUDITOR) as auditor:
        with pytest.raises(openai.PermissionDeniedError):
            await alice.files.create(file=("b.jsonl", batch_lines("gpt-4o", "o3-mini")), purpose="batch")
        own = await alice.files.create(file=("b.jsonl", batch_lines("gpt-4o", "gpt-4o")), purpose="batch")
        await alice.batches.create(
            input_file_id=own.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        foreign = await builder.files.create(file=("b.jsonl", batch_lines("o3-mini")), purpose="batch")
        with pytest.raises(openai.PermissionDeniedError):  # read back from Azure when the batch is made
            await auditor.batches.create(
                input_file_id=foreign.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
    assert len([r for r in emulator.received if r.path.startswith("/openai/batches")]) == 1


async def test_fine_tuning_base_models_are_checked(proxy: Proxy, emulator: Emulator) -> None:
    async with sdk(proxy, ALICE) as alice:
        training = await alice.files.create(file=("t.jsonl", b'{"messages": []}'), purpose="fine-tune")
        with pytest.raises(openai.PermissionDeniedError):
            await alice.fine_tuning.jobs.create(model="gpt-4o-mini-2024-07-18", training_file=training.id)
    assert not [r for r in emulator.received if "fine_tuning" in r.path]


async def test_ambiguous_model_fields_are_refused(proxy: Proxy, emulator: Emulator) -> None:
    headers = {"Authorization": f"Bearer {ALICE}"}
    async with httpx.AsyncClient(base_url=str(proxy.url), headers=headers) as client:
        escaped = await client.post(
            "/v1/chat/completions",
            content=rb'{"model": "gpt-4o", "mod\u0065l": "o3-mini", "messages": []}',
            headers={"Content-Type": "application/json"},
        )
        assert escaped.status_code == 400
        boundary = "azproxy-test-boundary"
        form = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; name*=UTF-8''model\r\n\r\no3-mini\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
            f"--{boundary}--\r\n"
        )
        spelled = await client.post(
            "/v1/audio/transcriptions",
            content=form.encode(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert spelled.status_code == 400
    assert emulator.received == []
