"""Client keys as tenants: stored objects are their creator's; others get OpenAI's 404 and never see them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

from azproxy.clients import Client, ClientConfigError, clients_from_table, digest
from azproxy.emulator import Emulator
from azproxy.errors import BadRequest
from azproxy.operations import OPERATIONS
from azproxy.owners import SQLITE_FILE
from azproxy.tenancy import Effect, OwnersUnavailable, Tenancy, touch_of
from azproxy.translate import IncomingRequest

from .conftest import AZURE_KEY, SECRETS, Proxy, ProxyFactory
from .test_security import redis_url  # noqa: F401  (the fixture: a private redis-server, or a skip)

ALICE, BOB, OPS = "sk-tenant-alice-0001", "sk-tenant-bob-00002", "sk-tenant-operator-3"
SECRETS.update({ALICE, BOB, OPS})
SDK_DEPRECATED = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def clients_file(tmp_path: Path) -> Path:
    path = tmp_path / "clients.toml"
    path.write_text(
        """
[[client]]
name = "alice"
key = "env:ALICE_KEY"

[[client]]
name = "bob"
key = "env:BOB_KEY"

[[client]]
name = "ops"
key = "env:OPS_KEY"
shared_objects = true
"""
    )
    return path


@pytest.fixture
def tenant_settings(clients_file: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "AZURE_OPENAI_TOKEN": AZURE_KEY,
        "AZPROXY_CLIENTS_FILE": str(clients_file),
        "AZPROXY_STATE_DIR": str(tmp_path / "state"),
        "ALICE_KEY": ALICE,
        "BOB_KEY": BOB,
        "OPS_KEY": OPS,
    }


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Proxy], dict[str, openai.AsyncOpenAI]]]:
    """The official SDK as alice, bob and ops against one azproxy; every client is closed at the end."""
    made: list[openai.AsyncOpenAI] = []

    def sdk_clients(proxy: Proxy) -> dict[str, openai.AsyncOpenAI]:
        keys = {"alice": ALICE, "bob": BOB, "ops": OPS}
        clients = {
            name: openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)
            for name, key in keys.items()
        }
        made.extend(clients.values())
        return clients

    yield sdk_clients
    for client in made:
        await client.close()


@pytest.fixture
async def tenants(
    make_proxy: ProxyFactory,
    tenant_settings: dict[str, str],
    connect: Callable[[Proxy], dict[str, openai.AsyncOpenAI]],
) -> dict[str, openai.AsyncOpenAI]:
    return connect(await make_proxy(**tenant_settings))


def assert_missing(caught: pytest.ExceptionInfo[openai.NotFoundError], message: str) -> None:
    """OpenAI's shape for a missing object: type invalid_request_error, its wording."""
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["message"] == message
    assert error["type"] == "invalid_request_error"


async def test_files_belong_to_their_creator(
    tenants: dict[str, openai.AsyncOpenAI], emulator: Emulator, tmp_path: Path
) -> None:
    alice, bob, ops = tenants["alice"], tenants["bob"], tenants["ops"]
    mine = await alice.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
    theirs = await bob.files.create(file=("b.jsonl", b"{}\n"), purpose="batch")
    seen = len(emulator.received)
    for attempt in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError) as caught:
            await attempt(mine.id)
        assert_missing(caught, f"No such File object: {mine.id}")
    assert len(emulator.received) == seen  # refused before Azure was asked
    assert [f.id async for f in alice.files.list()] == [mine.id]
    assert [f.id async for f in bob.files.list()] == [theirs.id]
    assert {f.id async for f in ops.files.list()} == {mine.id, theirs.id}
    assert (await ops.files.retrieve(mine.id)).id == mine.id
    assert (await alice.files.content(mine.id)).content == b"{}\n"
    assert (tmp_path / "state" / SQLITE_FILE).exists()
    await alice.files.delete(mine.id)
    with pytest.raises(openai.NotFoundError):  # forgotten with the file: nobody can claim the id again
        await alice.files.retrieve(mine.id)


async def test_listing_pages_name_only_kept_objects(tenants: dict[str, openai.AsyncOpenAI]) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    mine = await alice.files.create(file=("a.txt", b"a"), purpose="assistants")
    await bob.files.create(file=("b.txt", b"b"), purpose="assistants")
    page = await alice.files.with_raw_response.list()
    listing = json.loads(page.content)
    assert [item["id"] for item in listing["data"]] == [mine.id]
    assert listing["first_id"] == listing["last_id"] == mine.id


async def test_stored_responses_cannot_be_continued_by_others(tenants: dict[str, openai.AsyncOpenAI]) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    first = await alice.responses.create(model="gpt-4o", input="one")
    stream = await alice.responses.create(
        model="gpt-4o", input="two", previous_response_id=first.id, stream=True
    )
    events = [event async for event in stream]
    streamed = events[0].response.id  # recorded from its response.created event
    for previous in (first.id, streamed):
        with pytest.raises(openai.NotFoundError) as caught:
            await bob.responses.create(model="gpt-4o", input="mine now", previous_response_id=previous)
        assert_missing(caught, f"Previous response with id '{previous}' not found.")
        assert caught.value.code == "previous_response_not_found"
        assert caught.value.param == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            await bob.responses.retrieve(previous)
    follow_up = await alice.responses.create(model="gpt-4o", input="three", previous_response_id=streamed)
    assert (await alice.responses.retrieve(follow_up.id)).id == follow_up.id
    unstored = await bob.responses.create(model="gpt-4o", input="x", store=False)
    with pytest.raises(openai.NotFoundError):  # store: false is not recorded
        await bob.responses.retrieve(unstored.id)


@SDK_DEPRECATED
async def test_assistants_and_threads_belong_to_their_creator(tenants: dict[str, openai.AsyncOpenAI]) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    assistant = await alice.beta.assistants.create(model="gpt-4o", name="alice's")
    own_thread = await bob.beta.threads.create()
    with pytest.raises(openai.NotFoundError) as caught:
        await bob.beta.threads.runs.create(own_thread.id, assistant_id=assistant.id)
    assert_missing(caught, f"No assistant found with id '{assistant.id}'.")
    with pytest.raises(openai.NotFoundError):
        await bob.beta.threads.create_and_run(assistant_id=assistant.id)
    with pytest.raises(openai.NotFoundError):
        await bob.beta.assistants.update(assistant.id, name="bob's")
    run = await alice.beta.threads.create_and_run(assistant_id=assistant.id)  # the new thread is alice's
    assert (await alice.beta.threads.retrieve(run.thread_id)).id == run.thread_id
    with pytest.raises(openai.NotFoundError) as caught:
        await bob.beta.threads.messages.list(run.thread_id)
    assert_missing(caught, f"No thread found with id '{run.thread_id}'.")
    with pytest.raises(openai.NotFoundError):
        await bob.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
    assert [a.id async for a in bob.beta.assistants.list()] == []
    assert [a.id async for a in alice.beta.assistants.list()] == [assistant.id]


@SDK_DEPRECATED
async def test_references_to_others_objects_are_refused(
    tenants: dict[str, openai.AsyncOpenAI], emulator: Emulator
) -> None:
    alice, bob = tenants["alice"], tenants["bob"]
    hers = await alice.files.create(file=("t.jsonl", b"{}\n"), purpose="fine-tune")
    store = await bob.vector_stores.create(name="bob's")
    seen = len(emulator.received)
    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "file_id": lambda: bob.vector_stores.files.create(store.id, file_id=hers.id),
        "file_ids[0]": lambda: bob.vector_stores.file_batches.create(store.id, file_ids=[hers.id]),
        "input_file_id": lambda: bob.batches.create(
            input_file_id=hers.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
        "training_file": lambda: bob.fine_tuning.jobs.create(model="gpt-4o", training_file=hers.id),
        "tool_resources.code_interpreter.file_ids[0]": lambda: bob.beta.assistants.create(
            model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [hers.id]}}
        ),
        "messages[0].attachments[0].file_id": lambda: bob.beta.threads.create(
            messages=[{"role": "user", "content": "x", "attachments": [{"file_id": hers.id}]}]
        ),
    }
    for param, attempt in attempts.items():
        with pytest.raises(openai.NotFoundError) as caught:
            await attempt()
        assert_missing(caught, f"No such File object: {hers.id}")
        assert caught.value.param == param
    her_store = await alice.vector_stores.create(name="alice's")
    with pytest.raises(openai.NotFoundError) as caught:
        await bob.beta.assistants.create(
            model="gpt-4o", tool_resources={"file_search": {"vector_store_ids": [her_store.id]}}
        )
    assert_missing(caught, f"No vector store found with id '{her_store.id}'.")
    assert len(emulator.received) == seen + 1  # only alice's vector store reached Azure
    await alice.fine_tuning.jobs.create(model="gpt-4o", training_file=hers.id)  # her own file is fine


async def test_files_azure_makes_for_a_batch_are_its_owners(tenants: dict[str, openai.AsyncOpenAI]) -> None:
    bob, alice = tenants["bob"], tenants["alice"]
    source = await bob.files.create(file=("in.jsonl", b"{}\n"), purpose="batch")
    batch = await bob.batches.create(
        input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        await alice.batches.retrieve(batch.id)
    for _ in range(3):  # the emulator moves a batch one step per read
        batch = await bob.batches.retrieve(batch.id)
    made = batch.error_file_id or batch.output_file_id
    assert made is not None
    assert (await bob.files.content(made)).content
    with pytest.raises(openai.NotFoundError):
        await alice.files.content(made)


async def test_records_survive_a_restart(
    make_proxy: ProxyFactory,
    tenant_settings: dict[str, str],
    connect: Callable[[Proxy], dict[str, openai.AsyncOpenAI]],
) -> None:
    before = connect(await make_proxy(**tenant_settings))
    mine = await before["alice"].files.create(file=("a.txt", b"a"), purpose="assistants")
    after = connect(await make_proxy(**tenant_settings))  # a new app, the same state directory
    assert (await after["alice"].files.retrieve(mine.id)).id == mine.id
    with pytest.raises(openai.NotFoundError):
        await after["bob"].files.retrieve(mine.id)


async def test_several_instances_agree_through_redis(
    make_proxy: ProxyFactory,
    tenant_settings: dict[str, str],
    connect: Callable[[Proxy], dict[str, openai.AsyncOpenAI]],
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    settings = tenant_settings | {"AZPROXY_REDIS_URL": redis_url}
    first = connect(await make_proxy(**settings))
    second = connect(await make_proxy(**settings))
    response = await first["alice"].responses.create(model="gpt-4o", input="one")
    await second["alice"].responses.create(model="gpt-4o", input="two", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError):
        await second["bob"].responses.create(model="gpt-4o", input="x", previous_response_id=response.id)
    assert not (tmp_path / "state" / SQLITE_FILE).exists()


async def test_without_client_keys_nothing_changes(
    make_proxy: ProxyFactory, tmp_path: Path, emulator: Emulator
) -> None:
    proxy = await make_proxy(AZPROXY_STATE_DIR=str(tmp_path / "state"))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=AZURE_KEY, max_retries=0) as client:
        uploaded = await client.files.create(file=("a.txt", b"a"), purpose="assistants")
        emulator_made = emulator.resources.store_file("outside.txt", "assistants", b"o")  # not via azproxy
        assert {f.id async for f in client.files.list()} == {uploaded.id, emulator_made["id"]}
        await client.files.retrieve(emulator_made["id"])
    assert not (tmp_path / "state").exists()


async def test_objects_made_outside_azproxy_are_for_shared_clients_only(
    tenants: dict[str, openai.AsyncOpenAI], emulator: Emulator
) -> None:
    outside = emulator.resources.store_file("outside.txt", "assistants", b"o")["id"]
    with pytest.raises(openai.NotFoundError):
        await tenants["alice"].files.retrieve(outside)
    assert [f.id async for f in tenants["alice"].files.list()] == []
    assert (await tenants["ops"].files.retrieve(outside)).id == outside
    made = await tenants["ops"].files.create(file=("o.txt", b"o"), purpose="assistants")
    with pytest.raises(openai.NotFoundError):  # an operator's creations are its own
        await tenants["alice"].files.retrieve(made.id)


async def test_paths_azproxy_cannot_attribute_are_refused(
    make_proxy: ProxyFactory, tenant_settings: dict[str, str]
) -> None:
    proxy = await make_proxy(**tenant_settings)
    async with httpx.AsyncClient(base_url=proxy.base_url) as client:
        reply = await client.get(
            "/fine_tuning/checkpoints/x/permissions", headers={"Authorization": f"Bearer {BOB}"}
        )
        assert reply.status_code == 404
        assert reply.json()["error"]["code"] == "unknown_url"
        twice = b'{"input_file_id": "file-mine", "input_file_id": "file-hers"}'
        reply = await client.post("/batches", content=twice, headers={"Authorization": f"Bearer {BOB}"})
        assert reply.status_code == 400


def test_what_a_request_touches() -> None:
    touch = touch_of("POST", "/v1/threads/thread_1/runs", json.dumps({"assistant_id": "asst_1"}).encode())
    assert [(r.id, r.param) for r in touch.refs] == [("thread_1", None), ("asst_1", "assistant_id")]
    assert touch_of("GET", "/v1/files/", b"").effect is Effect.LIST
    assert touch_of("DELETE", "/files/file%2D1", b"").object_id == "file-1"
    assert touch_of("POST", "/v1/threads/runs", b"{}").effect is Effect.CREATE_THREAD
    assert touch_of("GET", "/v1/fine_tuning/jobs/ftjob-1/events", b"").refs[0].id == "ftjob-1"
    opaque = {"metadata": {"file_id": "x"}, "tools": [{"function": {"parameters": {"file_id": "y"}}}]}
    assert touch_of("POST", "/v1/assistants", json.dumps(opaque).encode()).refs == ()
    with pytest.raises(BadRequest):
        touch_of("POST", "/v1/responses", b'{"previous_response_id": 7}')


def test_shared_objects_is_a_boolean(tmp_path: Path) -> None:
    entry = {"name": "ops", "key": "env:OPS_KEY", "shared_objects": True}
    assert clients_from_table([entry], {"OPS_KEY": OPS}, tmp_path)[0].shared_objects
    with pytest.raises(ClientConfigError, match="shared_objects"):
        clients_from_table([entry | {"shared_objects": "yes"}], {"OPS_KEY": OPS}, tmp_path)


class _Unreachable:
    """A store whose backend is down."""

    def owners(self, ids: object) -> dict[str, str]:
        raise ConnectionError("down")

    def claim(self, ids: object, owner: str) -> None:
        raise ConnectionError("down")

    def forget(self, object_id: str) -> None:
        raise ConnectionError("down")


async def test_unreadable_records_refuse_rather_than_show() -> None:
    request = IncomingRequest(
        "GET", "/v1/files/file-1", "/v1/files/file-1", MultiDict(), CIMultiDictProxy(CIMultiDict()), b""
    )
    with pytest.raises(OwnersUnavailable) as caught:
        await Tenancy(_Unreachable()).admit(
            Client("ops", digest(OPS), shared_objects=True), OPERATIONS["files"], request
        )
    assert caught.value.status == 503
