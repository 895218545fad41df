"""Client keys as tenants: a stored object created through azproxy belongs to the client that created it.

With client keys on, every request of a family that stores objects (files, batches, fine-tuning jobs,
assistants, threads, vector stores, Responses) is checked before it is sent: the object its path names and
every object its JSON body refers to (`previous_response_id`, `assistant_id`, `file_id`, `vector_store_ids`,
`training_file`, `input_file_id`, nested ones included) must belong to the client, else 404 worded as OpenAI
words a missing object, the same whether the object is another client's or does not exist. Answers then record
what a create made (from its JSON, or from the first events of a stream), forget what a delete removed, hide
other clients' objects from listings, and give an object's owner the files Azure made for it (batch output and
error files, fine-tuning result files, files code interpreter wrote into a thread). Objects azproxy never saw
being created have no owner: only clients with `shared_objects = true` see them, and those see everything.

Which ids a request touches and what an answer says are pure functions here; `Tenancy` adds the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Final, TypeVar
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy

from .clients import Client
from .errors import BadGateway, BadRequest, NotFound, ProxyError
from .operations import Operation, operation_path
from .owners import OwnerStore
from .relay import EventWatch
from .translate import IncomingRequest

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind of stored object, and how OpenAI says one is missing."""

    missing: str
    code: str | None = None


FILE: Final = Kind("No such File object: {id}")
BATCH: Final = Kind("No batch found with id '{id}'.")
FINE_TUNING_JOB: Final = Kind("No fine-tuning job found with id '{id}'.")
ASSISTANT: Final = Kind("No assistant found with id '{id}'.")
THREAD: Final = Kind("No thread found with id '{id}'.")
VECTOR_STORE: Final = Kind("No vector store found with id '{id}'.")
RESPONSE: Final = Kind("Response with id '{id}' not found.")
PREVIOUS_RESPONSE: Final = Kind("Previous response with id '{id}' not found.", "previous_response_not_found")

#: The operation families that store objects, by the collection their ids live in.
FAMILIES: Final[Mapping[str, Kind]] = {
    "files": FILE,
    "batches": BATCH,
    "fine_tuning/jobs": FINE_TUNING_JOB,
    "assistants": ASSISTANT,
    "threads": THREAD,
    "vector_stores": VECTOR_STORE,
    "responses": RESPONSE,
}
TENANTED: Final = frozenset(family.partition("/")[0] for family in FAMILIES)

#: Body members that name another stored object, wherever they sit (`tool_resources.file_search...`).
REFERENCES: Final[Mapping[str, Kind]] = {
    "previous_response_id": PREVIOUS_RESPONSE,
    "assistant_id": ASSISTANT,
    "file_id": FILE,
    "file_ids": FILE,
    "training_file": FILE,
    "validation_file": FILE,
    "input_file_id": FILE,
    "vector_store_id": VECTOR_STORE,
    "vector_store_ids": VECTOR_STORE,
}
#: Answer members naming files Azure made for an object; they go to that object's owner.
DERIVED: Final = frozenset({"output_file_id", "error_file_id", "result_files", "file_id"})
#: Members whose content is the client's own free-form data (metadata, JSON schemas), never a reference.
OPAQUE: Final = frozenset({"metadata", "attributes", "parameters", "schema"})
#: Paths right under a collection that are actions, not object ids.
_ACTIONS: Final = {"threads": frozenset({"runs"}), "responses": frozenset({"input_tokens", "compact"})}
#: The most of a create's event stream read to find the new object's id.
MAX_SCANNED: Final = 1024 * 1024


class Effect(Enum):
    """What a successful answer changes in the ownership records, or hides."""

    NONE = "none"
    CREATE = "create"  # the answer's `id` is the client's
    CREATE_THREAD = "create_thread"  # `threads/runs`: the run's `thread_id` is
    LIST = "list"  # only the client's objects stay in `data`
    DELETE = "delete"  # the object in the path is forgotten
    ADOPT = "adopt"  # files the answer names belong to the path object's owner


@dataclass(frozen=True, slots=True)
class Ref:
    """An id a request touches, and where: None for the path, else the body member (`attachments[0].file_id`)."""

    id: str
    kind: Kind
    param: str | None = None

    def missing(self) -> NotFound:
        return NotFound(self.kind.missing.format(id=self.id), param=self.param, code=self.kind.code)


@dataclass(frozen=True, slots=True)
class Touch:
    """What one request touches: the ids to check, and what its answer changes."""

    refs: tuple[Ref, ...]
    effect: Effect = Effect.NONE
    #: The object the path names, if any.
    object_id: str | None = None
    #: False for a Responses create with `store: false`: Azure keeps nothing, so nothing is recorded.
    stored: bool = True
    #: False for a path in a storing family whose object azproxy cannot tell (only shared clients pass).
    attributable: bool = True


class OwnersUnavailable(ProxyError):
    """503: the ownership records cannot be read, so nothing can be shown safely."""

    status = 503
    error_type = "server_error"


def touch_of(method: str, raw_path: str, body: bytes) -> Touch:
    """The ids a request of a storing family touches: the path's object, then the body's references."""
    parts = [unquote(part) for part in operation_path(raw_path.partition("?")[0]).split("/")]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()  # a trailing slash names the same thing
    family, at = parts[0], 1
    if family == "fine_tuning":
        if parts[1:2] != ["jobs"]:
            return Touch((), attributable=False)
        family, at = "fine_tuning/jobs", 2
    document = _document(body) if body and (family != "files" or method != "POST") else {}
    refs = tuple(_references(document))
    stored = document.get("store") is not False
    if len(parts) == at:
        effect = {"GET": Effect.LIST, "POST": Effect.CREATE}.get(method, Effect.NONE)
        return Touch(refs, effect, stored=stored)
    object_id, rest = parts[at], parts[at + 1 :]
    if not rest and object_id in _ACTIONS.get(family, ()):
        effect = Effect.CREATE_THREAD if family == "threads" and method == "POST" else Effect.NONE
        return Touch(refs, effect, stored=stored)
    refs = (Ref(object_id, FAMILIES[family]), *refs)
    return Touch(refs, _object_effect(method, family, rest), object_id)


def _object_effect(method: str, family: str, rest: list[str]) -> Effect:
    if method == "DELETE" and not rest:
        return Effect.DELETE
    if method == "GET" and (
        (family in ("batches", "fine_tuning/jobs") and not rest)
        or (family == "threads" and rest[:1] == ["messages"])
    ):
        return Effect.ADOPT
    return Effect.NONE


def _document(body: bytes) -> dict[str, Any]:
    """The JSON object body; one that cannot be read cannot be checked, so it is refused, as is one naming a
    reference member twice (a check on one copy and Azure reading the other would disagree)."""
    try:
        document = json.loads(body.decode(), object_pairs_hook=_once)
    except _NamedTwice as twice:
        raise BadRequest(f"The request body names '{twice.key}' more than once.", param=twice.key) from None
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    return document


class _NamedTwice(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    named = [key for key, _ in pairs if key in REFERENCES]
    if len(named) != len(set(named)):
        raise _NamedTwice(next(key for key in named if named.count(key) > 1))
    return dict(pairs)


def _references(document: dict[str, Any]) -> Iterator[Ref]:
    for where, key, value in _members(document, REFERENCES.keys()):
        kind = REFERENCES[key]
        if value is None:
            continue
        if isinstance(value, str):
            yield Ref(value, kind, where)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            yield from (Ref(item, kind, f"{where}[{index}]") for index, item in enumerate(value))
        else:
            raise BadRequest(f"'{where}' must be an id or a list of ids.", param=where)


def _members(document: Any, keys: Collection[str]) -> Iterator[tuple[str, str, Any]]:
    """Every member named one of `keys`, at any depth but inside OPAQUE members, with its dotted path
    (iterative: a deeply nested body must not exhaust the stack)."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key in OPAQUE:
                    continue
                where = f"{path}.{key}" if path else key
                if key in keys:
                    yield where, key, item
                if isinstance(item, dict | list):
                    stack.append((where, item))
        elif isinstance(value, list):
            stack.extend(
                (f"{path}[{i}]", item) for i, item in enumerate(value) if isinstance(item, dict | list)
            )


def derived_ids(document: Any) -> set[str]:
    """The files an answer names (batch output and error files, fine-tuning results, thread files)."""
    found: set[str] = set()
    for _, _, value in _members(document, DERIVED):
        values = value if isinstance(value, list) else [value]
        found.update(item for item in values if isinstance(item, str) and item)
    return found


def created_id(effect: Effect, document: Any) -> str | None:
    """The id a create's answer makes its client's."""
    if not isinstance(document, dict):
        return None
    found = document.get("thread_id" if effect is Effect.CREATE_THREAD else "id")
    return found if isinstance(found, str) and found else None


def listed_ids(document: Any) -> list[str]:
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return []
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


def only_owned(document: dict[str, Any], owners: Mapping[str, str], client: str) -> dict[str, Any]:
    """A listing with only `client`'s objects in `data`; `first_id` and `last_id` then name kept ones."""
    data = document.get("data")
    if not isinstance(data, list):
        return document
    kept = [item for item in data if isinstance(item, dict) and owners.get(str(item.get("id"))) == client]
    document = document | {"data": kept}
    for name, index in (("first_id", 0), ("last_id", -1)):
        if name in document:
            document[name] = kept[index]["id"] if kept else None
    return document


def event_object_id(event: bytes) -> str | None:
    """The new object an event of a create's stream names: `response.created`, `thread.created`, or the first
    run event of `threads/runs` (its `thread_id`)."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
    try:
        document = json.loads(data) if data and data != b"[DONE]" else None
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    response = document.get("response")
    if document.get("type") == "response.created" and isinstance(response, dict):
        return created_id(Effect.CREATE, response)
    if document.get("object") == "thread":
        return created_id(Effect.CREATE, document)
    if document.get("object") == "thread.run":
        return created_id(Effect.CREATE_THREAD, document)
    return None


def without_compression(incoming: IncomingRequest) -> IncomingRequest:
    """The request asking for an uncompressed answer, which azproxy must read (creates, listings are small)."""
    if "Accept-Encoding" not in incoming.headers:
        return incoming
    headers = CIMultiDict(incoming.headers)
    del headers["Accept-Encoding"]
    return replace(incoming, headers=CIMultiDictProxy(headers))


class Tenancy:
    """The request-path step: check before sending, then record, forget or filter from the answer."""

    def __init__(self, store: OwnerStore) -> None:
        self._store = store

    async def admit(self, client: Client, operation: Operation, incoming: IncomingRequest) -> Watch | None:
        """404 for what the client may not touch; the watch its answer needs, if any."""
        if operation.name not in TENANTED:
            return None
        touch = touch_of(incoming.method, incoming.raw_path, incoming.body)
        if not touch.attributable and not client.shared_objects:
            raise NotFound(
                f"Unknown request URL: {incoming.method} {incoming.path}. azproxy cannot tell whose object "
                "it names.",
                code="unknown_url",
            )
        ids = [ref.id for ref in touch.refs]
        owners = await self.call(self._store.owners, ids) if ids else {}
        if not client.shared_objects:
            for ref in touch.refs:
                if owners.get(ref.id) != client.name:
                    raise ref.missing()
        if touch.effect is Effect.NONE:
            return None
        owner = owners.get(touch.object_id) if touch.object_id is not None else client.name
        return Watch(self, client, touch, owner, without_compression(incoming))

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        """A store call in a thread; any failure becomes 503, logged by its type only (a message could carry
        the Redis URL)."""
        try:
            return await asyncio.to_thread(method, *args)
        except Exception as exc:
            log.error("ownership records unavailable: %s", type(exc).__name__)
            raise OwnersUnavailable(
                "azproxy cannot read its ownership records right now; try again shortly.",
                code="owners_unavailable",
                headers={"retry-after": "1"},
            ) from None

    async def claim(self, ids: Collection[str], owner: str) -> None:
        """Record after the fact: the object exists whatever happens here, so a failure is logged, not raised
        (the object then stays out of reach of its creator too, never within reach of others)."""
        if ids:
            try:
                await self.call(self._store.claim, ids, owner)
            except OwnersUnavailable:
                log.error("%d new object(s) of client %r could not be recorded", len(ids), owner)

    async def forget(self, object_id: str) -> None:
        try:
            await self.call(self._store.forget, object_id)
        except OwnersUnavailable:
            log.error("a deleted object's ownership record could not be removed")

    async def owners(self, ids: Collection[str]) -> dict[str, str]:
        return await self.call(self._store.owners, ids) if ids else {}


class Watch:
    """One admitted request's answer, as tenancy needs to see it: `on_json_answer` for a whole 2xx JSON answer,
    `on_events` for the stream of a create."""

    __slots__ = ("_buffer", "_client", "_owner", "_scanned", "_tenancy", "_touch", "incoming", "on_events")

    def __init__(
        self, tenancy: Tenancy, client: Client, touch: Touch, owner: str | None, incoming: IncomingRequest
    ) -> None:
        self._tenancy = tenancy
        self._client = client
        self._touch = touch
        #: Whose the path's object is (a create's: the client's); None when azproxy never saw it created.
        self._owner = owner
        self.incoming = incoming
        self._buffer = b""
        self._scanned = 0
        creates = touch.effect in (Effect.CREATE, Effect.CREATE_THREAD) and touch.stored
        self.on_events: EventWatch | None = self._events if creates else None

    async def on_json_answer(self, body: bytes) -> bytes:
        effect = self._touch.effect
        try:
            document = json.loads(body)
        except ValueError:
            if effect is Effect.LIST:
                raise BadGateway(
                    "The backend's listing is not valid JSON.", code="upstream_invalid"
                ) from None
            return body
        if effect in (Effect.CREATE, Effect.CREATE_THREAD):
            created = created_id(effect, document)
            if created is not None and self._touch.stored:
                await self._tenancy.claim([created], self._client.name)
        elif effect is Effect.DELETE:
            deleted = not isinstance(document, dict) or document.get("deleted", True) is not False
            if deleted and self._touch.object_id is not None:
                await self._tenancy.forget(self._touch.object_id)
        elif effect is Effect.ADOPT and self._owner is not None:
            await self._tenancy.claim(derived_ids(document), self._owner)
        elif effect is Effect.LIST and isinstance(document, dict):
            return await self._listing(body, document)
        return body

    async def _listing(self, body: bytes, document: dict[str, Any]) -> bytes:
        owners = await self._tenancy.owners(
            listed_ids(document)
        )  # a failure is 503: nothing unchecked leaves
        shown = document if self._client.shared_objects else only_owned(document, owners, self._client.name)
        made: dict[str, set[str]] = {}
        for item in shown.get("data") or ():
            owner = owners.get(str(item.get("id"))) if isinstance(item, dict) else None
            if owner is not None:
                made.setdefault(owner, set()).update(derived_ids(item))
        for owner, ids in made.items():
            await self._tenancy.claim(ids, owner)
        return body if shown is document else json.dumps(shown).encode()

    async def _events(self, chunk: bytes) -> bool:
        """Reads a create's stream until the event naming the new object, and records it before that event
        reaches the client; True once done (found, or not within MAX_SCANNED: the object stays unowned)."""
        self._scanned += len(chunk)
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        while (end := self._buffer.find(b"\n\n")) >= 0:
            event, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            created = event_object_id(event)
            if created is not None:
                await self._tenancy.claim([created], self._client.name)
                return True
        if self._scanned > MAX_SCANNED:
            log.warning("a streamed create named no object in its first %d bytes; not recorded", MAX_SCANNED)
            return True
        return False
