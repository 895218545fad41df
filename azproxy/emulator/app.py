"""An Azure OpenAI data-plane emulator: the checks, errors and stream shapes of the real service, in-process.

It serves both URL styles: classic (`/openai/deployments/{name}/{operation}` and `/openai/{path}`, with a dated
`api-version`) and v1 (`/openai/v1/{operation}`, the deployment named by the body's `model`). It records every
request it receives, so tests assert on what "Azure" saw, and it can be told to fail (429 with `retry-after`),
to pace or hold its streams, and it notices when a client leaves mid-stream.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import hdrs, web
from multidict import CIMultiDict, MultiDict
from yarl import URL

from . import inference
from .assistants import Assistants
from .calls import Answer, AzureError, Call, Endpoint, Stream, headers
from .deployments import DEFAULT_DEPLOYMENTS, Catalog, Deployment
from .multipart import Form, parse_form
from .realtime import RealtimeSession
from .resources import Resources
from .responses import Responses
from .vector_stores import VectorStores
from .versions import classic_allows, v1_allows

_KEY_REFUSED: Final = (
    "Access denied due to invalid subscription key or wrong API endpoint. "
    "Make sure to provide a valid key for an active subscription and use a correct "
    "regional API endpoint for your resource."
)
_TOKEN_REFUSED: Final = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """A request as the emulator received it, body byte for byte (and, for forms, parsed too)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes
    multipart: Form | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.url.path

    @property
    def query(self) -> MultiDict[str]:
        return MultiDict(self.url.query)

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> Form:
        """The multipart/form-data parts as received: `.fields["purpose"]`, `.files["file"].content`."""
        if self.multipart is None:
            raise ValueError(
                f"{self.method} {self.path} did not carry a well-formed multipart/form-data body"
            )
        return self.multipart


@dataclass(frozen=True, slots=True)
class CannedFailure:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Emulator:
    """The emulator's state; `app()` serves it. Keys empty: any non-empty `api-key` is accepted.

    `entra_tokens` are the Microsoft Entra ID tokens accepted as `Authorization: Bearer TOKEN` instead of a key.
    """

    def __init__(
        self,
        *,
        api_keys: Iterable[str] = (),
        deployments: Iterable[Deployment] = DEFAULT_DEPLOYMENTS,
        chunks: int | None = None,
        chunk_delay: float = 0.0,
        record: bool = True,
        entra_tokens: Iterable[str] = (),
    ) -> None:
        self.api_keys = frozenset(api_keys)
        self.entra_tokens = frozenset(entra_tokens)
        self.catalog = Catalog(deployments)
        self.deployments = self.catalog.by_name
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.record = record
        self.received: list[ReceivedRequest] = []
        #: Every WebSocket frame realtime clients sent, text or binary, in order (when recording).
        self.realtime_frames: list[str | bytes] = []
        self.failures: deque[CannedFailure] = deque()
        #: When set, streams pause after their first content chunk until the event is set.
        self.stream_gate: asyncio.Event | None = None
        self.streams_started = 0
        self.streams_finished = 0
        self.streams_aborted = 0
        self.stream_aborted = asyncio.Event()
        self.chunks_sent = 0
        self.resources = Resources(self.catalog)
        self.assistants = Assistants(self.catalog)
        self.vector_stores = VectorStores(self.resources.files)
        self.responses = Responses(self.catalog)

    @property
    def last(self) -> ReceivedRequest:
        return self.received[-1]

    def fail_next(self, status: int = 429, *, retry_after: int = 2, times: int = 1) -> None:
        """Answer the next `times` requests with an error, 429 with `retry-after` by default, as Azure throttles."""
        message = (
            f"Requests to the Azure OpenAI API have exceeded the rate limit of your current pricing tier. "
            f"Please retry after {retry_after} seconds."
        )
        failure_headers = {"retry-after": str(retry_after), "retry-after-ms": str(retry_after * 1000)}
        for _ in range(times):
            self.failures.append(
                CannedFailure(status, {"error": {"code": str(status), "message": message}}, failure_headers)
            )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        router = app.router
        router.add_get("/openai/realtime", self._realtime(v1=False))
        router.add_get("/openai/v1/realtime", self._realtime(v1=True))
        router.add_route("*", "/openai/deployments/{deployment}/{operation:.+}", self._deployment_operation)
        for operation in inference.OPERATIONS:
            router.add_route("*", f"/openai/v1/{operation}", self._v1_deployment_operation(operation))
        endpoints = (
            *self.resources.endpoints(),
            *self.assistants.endpoints(),
            *self.vector_stores.endpoints(),
            *self.responses.endpoints(),
        )
        for endpoint in endpoints:
            router.add_route(endpoint.method, f"/openai/{endpoint.path}", self._endpoint(endpoint, v1=False))
            if endpoint.v1:
                router.add_route(
                    endpoint.method, f"/openai/v1/{endpoint.path}", self._endpoint(endpoint, v1=True)
                )
        router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _deployment_operation(self, request: web.Request) -> web.StreamResponse:
        """Classic style: the deployment in the path; unknown → 404, before the operation and method are looked at."""
        operation = request.match_info["operation"]

        def handle(call: Call) -> Answer:
            deployment = self.catalog.resolve(request.match_info["deployment"], operation)
            if request.method != "POST":
                raise AzureError(405, "405", "Method not allowed")
            return inference.answer(call, operation, deployment)

        return await self._serve(request, operation, False, handle)

    def _v1_deployment_operation(self, operation: str) -> Handler:
        """v1 style: the body's `model` (JSON, or the form field) names the deployment."""

        def handle(call: Call) -> Answer:
            if call.request.method != "POST":
                raise AzureError(405, "405", "Method not allowed")
            deployment = self.catalog.resolve(inference.named_deployment(call, operation), operation)
            return inference.answer(call, operation, deployment)

        async def serve(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, operation, True, handle)

        return serve

    def _endpoint(self, endpoint: Endpoint, v1: bool) -> Handler:
        async def serve(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, endpoint.operation, v1, endpoint.handler)

        return serve

    async def _serve(
        self, request: web.Request, operation: str, v1: bool, handle: Callable[[Call], Answer]
    ) -> web.StreamResponse:
        call = await self._receive(request, v1)
        refusal = self._refusal(request, operation, v1)
        if refusal is not None:
            return refusal
        try:
            answer = handle(call)
        except AzureError as error:
            return error.response()
        return await self._stream(request, answer) if isinstance(answer, Stream) else answer

    async def _receive(self, request: web.Request, v1: bool) -> Call:
        """Read and record the request; a multipart body is also parsed, for the handler and for `.form()`."""
        body = await request.read()
        form = None
        if request.content_type == "multipart/form-data":
            form = await parse_form(request.headers[hdrs.CONTENT_TYPE], body)
        if self.record:
            self.received.append(
                ReceivedRequest(request.method, request.url, CIMultiDict(request.headers), body, form)
            )
        return Call(request, body, form, v1, _int_header(request, "x-emulator-chunks", self.chunks))

    def _refusal(
        self, request: web.Request, operation: str, v1: bool, key_in_query: bool = False
    ) -> web.Response | None:
        """Azure's checks, in Azure's order: credentials, api-version, then injected failures."""
        refused = self._credentials_refused(request, v1, key_in_query)
        if refused is not None:
            return AzureError(401, "401", refused).response()
        versions = request.query.getall("api-version", [])
        if v1 and not v1_allows(versions):
            return AzureError(400, "BadRequest", "API version not supported").response()
        if not v1 and not classic_allows(operation, versions):
            return AzureError(404, "404", "Resource not found").response()
        if self.failures:
            failure = self.failures.popleft()
            return web.json_response(failure.body, status=failure.status, headers=failure.headers)
        return None

    def _credentials_refused(self, request: web.Request, v1: bool, key_in_query: bool) -> str | None:
        """Why the credentials fail, or None.

        A bearer is read as an Entra token, even next to an `api-key`; only v1, like OpenAI's API, also takes the
        resource key as a bearer. Realtime takes `?api-key=` too: browsers cannot set headers on a WebSocket.
        """
        key = request.headers.get("api-key")
        if key is None and key_in_query:
            key = request.query.get("api-key")
        authorization = request.headers.get("Authorization", "").strip()
        if not authorization:
            return None if self._key_accepted(key) else _KEY_REFUSED
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token in self.entra_tokens:
            return None
        if v1 and key is None and scheme.lower() == "bearer" and self._key_accepted(token):
            return None
        return _TOKEN_REFUSED if key is None else _KEY_REFUSED

    def _key_accepted(self, key: str | None) -> bool:
        return bool(key) and (not self.api_keys or key in self.api_keys)

    def _realtime(self, v1: bool) -> Handler:
        """The WebSocket upgrade, refused before it happens (401, 404, unknown deployment) as Azure refuses it."""

        async def serve(request: web.Request) -> web.StreamResponse:
            call = await self._receive(request, v1)
            refusal = self._refusal(request, "realtime", v1, key_in_query=True)
            if refusal is not None:
                return refusal
            try:
                deployment = self.catalog.resolve(
                    request.query.get("model" if v1 else "deployment"), "realtime"
                )
            except AzureError as error:
                return error.response()
            frames = self.realtime_frames if self.record else []
            session = RealtimeSession(deployment, v1, frames, call.chunks)
            return await session.serve(request)

        return serve

    async def _stream(self, request: web.Request, stream: Stream) -> web.StreamResponse:
        delay = _float_header(request, "x-emulator-delay", self.chunk_delay)
        response = web.StreamResponse(headers=headers() | {"Content-Type": stream.content_type})
        self.streams_started += 1
        try:
            await response.prepare(request)
            for index, piece in enumerate(stream.pieces):
                await response.write(piece)
                self.chunks_sent += 1
                if index == stream.content.start and self.stream_gate is not None:
                    await self.stream_gate.wait()
                elif index in stream.content and delay:
                    await asyncio.sleep(delay)
            if stream.trailer:
                await response.write(stream.trailer)
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
        return AzureError(404, "404", "Resource not found").response()


def _int_header(request: web.Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def _float_header(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        return default
