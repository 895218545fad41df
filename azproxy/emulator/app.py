"""An Azure OpenAI data-plane emulator: the checks, errors and stream shapes of the real service, in-process.

It records every request it receives, so tests assert on what "Azure" saw, and it can be told to fail (429 with
`retry-after`), to pace or hold its streams, and it notices when a client leaves mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from . import answers

#: The data-plane versions the emulator accepts, as Azure does today; retired previews get 404 like Azure's.
API_VERSIONS: Final = frozenset(
    {
        "2023-05-15",
        "2024-02-01",
        "2024-06-01",
        "2024-10-21",
        "2024-08-01-preview",
        "2024-09-01-preview",
        "2024-10-01-preview",
        "2024-12-01-preview",
        "2025-01-01-preview",
        "2025-03-01-preview",
        "2025-04-01-preview",
    }
)

_OPERATIONS_BY_KIND: Final = {
    "chat": frozenset({"chat/completions"}),
    "completion": frozenset({"completions"}),
    "embedding": frozenset({"embeddings"}),
}
_RESPONSE_HEADERS: Final = {
    "x-ms-region": "East US",
    "x-ratelimit-remaining-requests": "119",
    "x-ratelimit-remaining-tokens": "119000",
    "azureml-model-session": "emulator",
}


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment: its name, the Azure model name answers report, and which operations it can do."""

    name: str
    model: str
    kind: str = "chat"


DEFAULT_DEPLOYMENTS: Final = (
    Deployment("gpt-35-turbo", "gpt-35-turbo"),
    Deployment("gpt-35-turbo-instruct", "gpt-35-turbo-instruct", "completion"),
    Deployment("gpt-4o", "gpt-4o-2024-08-06"),
    Deployment("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    Deployment("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
    Deployment("text-embedding-3-small", "text-embedding-3-small", "embedding"),
    Deployment("text-embedding-ada-002", "text-embedding-ada-002", "embedding"),
)


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes

    @property
    def path(self) -> str:
        return self.url.path

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(self.url.query)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class CannedFailure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Emulator:
    """The emulator's state; `app()` serves it. Keys empty: any non-empty `api-key` is accepted."""

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        deployments: Iterable[Deployment] = DEFAULT_DEPLOYMENTS,
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        record: bool = True,
    ) -> None:
        self.api_keys = frozenset(api_keys)
        self.deployments = {d.name: d for d in deployments}
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.record = record
        self.received: list[ReceivedRequest] = []
        self.failures: deque[CannedFailure] = deque()
        #: When set, streams pause after their first content chunk until the event is set.
        self.stream_gate: asyncio.Event | None = None
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0
        self.stream_aborted = asyncio.Event()
        self.chunks_sent = 0

    @property
    def last(self) -> ReceivedRequest:
        return self.received[-1]

    def fail_next(self, status: int = 429, *, retry_after: int = 2, times: int = 1) -> None:
        """Answer the next `times` requests with an error, 429 with `retry-after` by default, as Azure throttles."""
        message = (
            f"Requests to the Azure OpenAI API have exceeded the rate limit of your current pricing tier. "
            f"Please retry after {retry_after} seconds."
        )
        headers = {"retry-after": str(retry_after), "retry-after-ms": str(retry_after * 1000)}
        for _ in range(times):
            self.failures.append(
                CannedFailure(status, {"error": {"code": str(status), "message": message}}, headers)
            )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route(
            "*", "/openai/deployments/{deployment}/{operation:.+}", self._deployment_operation
        )
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _deployment_operation(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.record:
            self.received.append(
                ReceivedRequest(request.method, request.url, CIMultiDict(request.headers), body)
            )
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        deployment = self.deployments.get(request.match_info["deployment"])
        if deployment is None:
            return _azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. "
                "If you created the deployment within the last 5 minutes, please wait a moment "
                "and try again.",
            )
        operation = request.match_info["operation"]
        if operation not in _OPERATIONS_BY_KIND.get(deployment.kind, ()):
            return _azure_error(
                400,
                "OperationNotSupported",
                f"The {operation} operation does not work with the "
                f"specified model, {deployment.model}. Please choose different model and try again.",
            )
        if request.method != "POST":
            return _azure_error(405, "405", "Method not allowed")
        try:
            document = json.loads(body)
            if not isinstance(document, dict):
                raise ValueError
        except ValueError:
            return _azure_error(400, "BadRequest", "Could not parse the request body as JSON.")
        return await self._answer(request, operation, deployment, document)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Azure's checks, in Azure's order: credentials, api-version, then injected failures."""
        key = request.headers.get("api-key")
        bearer = request.headers.get("Authorization")
        if bearer is not None or not key or (self.api_keys and key not in self.api_keys):
            # A bearer next to api-key is read as an Entra token, and the emulator knows none.
            return _azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. "
                "Make sure to provide a valid key for an active subscription and use a correct "
                "regional API endpoint for your resource.",
            )
        if (
            request.query.get("api-version") not in API_VERSIONS
            or len(request.query.getall("api-version")) != 1
        ):
            return _azure_error(404, "404", "Resource not found")
        if self.failures:
            failure = self.failures.popleft()
            return web.json_response(failure.body, status=failure.status, headers=failure.headers)
        return None

    async def _answer(
        self, request: web.Request, operation: str, deployment: Deployment, body: dict[str, Any]
    ) -> web.StreamResponse:
        if answers.FILTER_TRIGGER in answers.prompt_text(body):
            return web.json_response(answers.content_filter_refusal(), status=400, headers=_headers())
        if operation == "embeddings":
            return web.json_response(answers.embeddings(body, deployment.model), headers=_headers())
        chunks = _int_header(request, "x-emulator-chunks", self.chunks)
        pieces = answers.answer_pieces(body, chunks)
        chat = operation == "chat/completions"
        if body.get("stream") is True:
            events = (answers.chat_stream if chat else answers.completion_stream)(
                body, deployment.model, pieces
            )
            first_content = 2 if chat else 1  # after the filter-only chunk (and the role chunk in chat)
            return await self._stream(request, events, range(first_content, first_content + len(pieces)))
        document = (answers.chat_completion if chat else answers.text_completion)(
            body, deployment.model, pieces
        )
        return web.json_response(document, headers=_headers())

    async def _stream(
        self, request: web.Request, events: Iterator[dict[str, Any]], content: range
    ) -> web.StreamResponse:
        delay = _float_header(request, "x-emulator-delay", self.chunk_delay)
        response = web.StreamResponse(
            headers=_headers() | {"Content-Type": "text/event-stream; charset=utf-8"}
        )
        self.streams_started += 1
        try:
            await response.prepare(request)
            for index, event in enumerate(events):
                await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
                self.chunks_sent += 1
                if index == content.start and self.stream_gate is not None:
                    await self.stream_gate.wait()
                elif index in content and delay:
                    await asyncio.sleep(delay)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.streams_aborted += 1
            self.stream_aborted.set()
            raise
        self.streams_finished += 1
        return response

    async def _not_found(self, request: web.Request) -> web.Response:
        if self.record:
            body = await request.read()
            self.received.append(
                ReceivedRequest(request.method, request.url, CIMultiDict(request.headers), body)
            )
        return _azure_error(404, "404", "Resource not found")


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=_headers())


def _headers() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return _RESPONSE_HEADERS | {"apim-request-id": request_id, "x-request-id": request_id}


def _int_header(request: web.Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def _float_header(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        return default
