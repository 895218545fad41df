"""An Azure OpenAI data-plane emulator: the checks, errors and stream shapes of the real service, in-process.

It serves both URL styles: classic (`/openai/deployments/{name}/{operation}` and `/openai/{path}`, with a dated
`api-version`) and v1 (`/openai/v1/{operation}`, the deployment named by the body's `model`). It records every
request it receives, so tests assert on what "Azure" saw, and it can be told to fail (429 with `retry-after`),
to pace or hold its streams, and it notices when a client leaves mid-stream.

Switches for behaviours Azure has but not by default: `gzip` (compress JSON answers and SSE streams when the
request accepts gzip; Azure does so when asked: HTTP semantics, RFC 9110 §12.5.3, as Azure's front door applies
them) and `async_filter` (the "Asynchronous Filter" streaming mode of a deployment's content filter).
"""

from __future__ import annotations

import asyncio
import gzip as gzip_format
import json
import zlib
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
from .response_socket import ResponseSocket
from .responses import Responses
from .vector_stores import VectorStores
from .versions import classic_allows, v1_allows
from .webrtc import EphemeralKey, RealtimeCalls

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
        gzip: bool = False,
        async_filter: bool = False,
    ) -> None:
        self.api_keys = frozenset(api_keys)
        self.entra_tokens = frozenset(entra_tokens)
        self.catalog = Catalog(deployments)
        self.deployments = self.catalog.by_name
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.record = record
        #: Compress JSON answers and SSE streams (each event flushed on its own) when the request accepts gzip.
        self.gzip = gzip
        #: Chat streams carry asynchronous-filter annotation chunks (see `answers.chat_stream`).
        self.async_filter = async_filter
        #: How long a Responses WebSocket lives before Azure's `websocket_connection_limit_reached` (60 minutes).
        self.responses_socket_max_age = 3600.0
        self.received: list[ReceivedRequest] = []
        #: Every WebSocket frame realtime clients sent, text or binary, in order (when recording).
        self.realtime_frames: list[str | bytes] = []
        #: Every frame Responses WebSocket clients sent, in order (when recording).
        self.response_frames: list[str | bytes] = []
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
        #: Ephemeral keys issued by `realtime/client_secrets` and WebRTC calls set up with `realtime/calls`.
        self.realtime_calls = RealtimeCalls(self.catalog)

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
        router.add_get("/openai/v1/responses", self._responses_socket)
        router.add_post("/openai/v1/realtime/client_secrets", self._client_secret)
        router.add_post("/openai/v1/realtime/calls", self._realtime_call)
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
            return inference.answer(call, operation, deployment, self.catalog.serving_model(deployment))

        return await self._serve(request, operation, False, handle)

    def _v1_deployment_operation(self, operation: str) -> Handler:
        """v1 style: the body's `model` (JSON, or the form field) names the deployment."""

        def handle(call: Call) -> Answer:
            if call.request.method != "POST":
                raise AzureError(405, "405", "Method not allowed")
            deployment = self.catalog.resolve(inference.named_deployment(call, operation), operation)
            return inference.answer(call, operation, deployment, self.catalog.serving_model(deployment))

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
            return self._encoded(request, refusal)
        try:
            answer = handle(call)
        except AzureError as error:
            return self._encoded(request, error.response())
        if isinstance(answer, Stream):
            return await self._stream(request, answer)
        return self._encoded(request, answer)

    def _encoded(self, request: web.Request, answer: web.StreamResponse) -> web.StreamResponse:
        """A JSON answer gzip-compressed, when the emulator compresses and the request accepts gzip."""
        if not self._gzips(request) or not isinstance(answer, web.Response):
            return answer
        if answer.content_type != "application/json" or not isinstance(answer.body, bytes):
            return answer
        answer.body = gzip_format.compress(answer.body)
        answer.headers["Content-Encoding"] = "gzip"
        answer.headers["Vary"] = "Accept-Encoding"
        return answer

    def _gzips(self, request: web.Request) -> bool:
        """Whether to compress: switched on, and `Accept-Encoding` names gzip without `q=0`."""
        accepted = request.headers.get(hdrs.ACCEPT_ENCODING, "").lower().replace(" ", "")
        return self.gzip and any(
            part.split(";")[0] == "gzip" and not part.endswith(("q=0", "q=0.0", "q=0.00", "q=0.000"))
            for part in accepted.split(",")
        )

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
        chunks = _int_header(request, "x-emulator-chunks", self.chunks)
        return Call(request, body, form, v1, chunks, self.async_filter)

    def _refusal(
        self,
        request: web.Request,
        operation: str,
        v1: bool,
        key_in_query: bool = False,
        ephemeral: bool = False,
    ) -> web.Response | None:
        """Azure's checks, in Azure's order: credentials, api-version, then injected failures.

        `ephemeral`: realtime on v1 also takes a live `ek_` key from `realtime/client_secrets` as a bearer.
        """
        refused = self._credentials_refused(request, v1, key_in_query)
        if refused is not None and ephemeral and self._ephemeral_key(request) is not None:
            refused = None
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

    def _ephemeral_key(self, request: web.Request) -> EphemeralKey | None:
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        return self.realtime_calls.valid(token) if scheme.lower() == "bearer" else None

    def _key_accepted(self, key: str | None) -> bool:
        return bool(key) and (not self.api_keys or key in self.api_keys)

    def _realtime(self, v1: bool) -> Handler:
        """The WebSocket upgrade, refused before it happens (401, 404, unknown deployment) as Azure refuses it."""

        async def serve(request: web.Request) -> web.StreamResponse:
            call = await self._receive(request, v1)
            refusal = self._refusal(request, "realtime", v1, key_in_query=True, ephemeral=v1)
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

    async def _responses_socket(self, request: web.Request) -> web.StreamResponse:
        """Responses over WebSocket; without an upgrade, GET on the collection is not an operation (404)."""
        if request.headers.get(hdrs.UPGRADE, "").lower() != "websocket":
            return await self._not_found(request)
        call = await self._receive(request, True)
        refusal = self._refusal(request, "responses", True)
        if refusal is not None:
            return self._encoded(request, refusal)
        frames = self.response_frames if self.record else []
        pace = (_float_header(request, "x-emulator-delay", self.chunk_delay), self.stream_gate)
        socket = ResponseSocket(self.responses, frames, call.chunks, pace, self.responses_socket_max_age)
        return await socket.serve(request)

    async def _client_secret(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "realtime", True, self.realtime_calls.client_secret)

    async def _realtime_call(self, request: web.Request) -> web.StreamResponse:
        """The SDP offer, authorised by an ephemeral key (or the resource's own credentials)."""
        call = await self._receive(request, True)
        refusal = self._refusal(request, "realtime", True, ephemeral=True)
        if refusal is not None:
            return self._encoded(request, refusal)
        try:
            return self.realtime_calls.create_call(call, self._ephemeral_key(request))
        except AzureError as error:
            return self._encoded(request, error.response())

    async def _stream(self, request: web.Request, stream: Stream) -> web.StreamResponse:
        """Send a stream, paced and gated; SSE gzip-compressed (when on and accepted) with a sync flush per event."""
        delay = _float_header(request, "x-emulator-delay", self.chunk_delay)
        encoder = None
        stream_headers = headers() | {"Content-Type": stream.content_type}
        if self._gzips(request) and stream.content_type.startswith("text/event-stream"):
            encoder = zlib.compressobj(wbits=31)  # gzip framing
            stream_headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        response = web.StreamResponse(headers=stream_headers)
        self.streams_started += 1
        try:
            await response.prepare(request)
            for index, piece in enumerate(stream.pieces):
                await response.write(_sync_flushed(encoder, piece))
                self.chunks_sent += 1
                if index == stream.content.start and self.stream_gate is not None:
                    await self.stream_gate.wait()
                elif index in stream.content and delay:
                    await asyncio.sleep(delay)
            if stream.trailer:
                await response.write(_sync_flushed(encoder, stream.trailer))
            if encoder is not None:
                await response.write(encoder.flush(zlib.Z_FINISH))
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            self.streams_aborted += 1
            self.stream_aborted.set()
            raise
        self.streams_finished += 1
        return response

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        if self.record:
            body = await request.read()
            self.received.append(
                ReceivedRequest(request.method, request.url, CIMultiDict(request.headers), body)
            )
        return self._encoded(request, AzureError(404, "404", "Resource not found").response())


def _sync_flushed(encoder: zlib._Compress | None, piece: bytes) -> bytes:
    """`piece` as is, or compressed and sync-flushed so the client can decode it before the next one comes."""
    return piece if encoder is None else encoder.compress(piece) + encoder.flush(zlib.Z_SYNC_FLUSH)


def _int_header(request: web.Request, name: str, default: int | None) -> int | None:
    value = request.headers.get(name)
    return int(value) if value is not None and value.isdigit() else default


def _float_header(request: web.Request, name: str, default: float) -> float:
    try:
        return float(request.headers.get(name, default))
    except ValueError:
        return default
