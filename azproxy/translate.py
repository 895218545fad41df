"""The translator: pure functions from an incoming OpenAI-shaped request to the request a backend receives.

No I/O here. `plan_request` reads the request once (route, model, client key); `to_upstream` turns that plan into
the exact URL, headers and body for one backend, so a retry on another backend reuses the plan. Two URL styles:
classic (`/openai/deployments/{deployment}/...?api-version=V`) and Azure's v1 (`/openai/v1/...`, the body's
model naming the deployment).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiMapping
from yarl import URL

from . import bodies
from .access import client_key
from .backends import Backend
from .config import ApiStyle, Mode
from .errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized, UnsupportedMediaType
from .headers import CLIENT_CREDENTIALS, HOP_BY_HOP, NOT_FOR_AZURE, copy_headers
from .operations import ModelIn, Operation, Scope, find_operation, operation_path

#: Azure deployment names are letters, digits, `.`, `_`, `-`; OpenAI fine-tune ids add `:`. Nothing that can
#: leave the path segment (`/`, `?`, `#`, `%`, `..`, controls) gets through.
_DEPLOYMENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,255}")
#: Ephemeral keys from `realtime/client_secrets`, which a WebRTC client presents to `realtime/calls`.
EPHEMERAL_PREFIX: Final = "ek_"


@dataclass(frozen=True, slots=True)
class IncomingRequest:
    """What the edge received, whichever way it arrived (reverse, absolute-URI, or inside a tunnel)."""

    method: str
    #: Origin-form path and query exactly as sent (`/v1/chat/completions?x=1`).
    raw_path: str
    path: str
    query: MultiMapping[str]
    headers: CIMultiDictProxy[str]
    body: bytes
    #: azproxy's id for the request, sent to Azure as `x-ms-client-request-id` so both logs name it alike.
    request_id: str | None = None
    #: The body as the client encoded it (`Content-Encoding: gzip`), when `body` is its decoded copy.
    sent_body: bytes | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What the request asks for, independent of the backend that will serve it."""

    operation: Operation | None
    model: str | None
    client_key: str | None
    #: The `stream_options` azproxy sends instead of the client's, to learn a stream's usage (JSON text);
    #: the relay then takes the usage out again, so the client sees the stream it asked for.
    stream_options: str | None = None

    @property
    def adds_stream_usage(self) -> bool:
        return self.stream_options is not None


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes


def plan_request(incoming: IncomingRequest, mode: Mode, *, stream_usage: bool = False) -> Plan:
    """Route and read the request once. openai mode relays any path and every body unchanged, but still reads
    the model of the operations it knows, so allowlists and limits hold there too.

    `stream_usage` asks Azure for the usage of chat and completion streams whose client did not ask for it.
    """
    key = client_key(incoming.headers)
    if mode is Mode.OPENAI:
        operation = find_operation(incoming.path)
        if operation is None or (operation.scope is Scope.DEPLOYMENT and incoming.method != "POST"):
            return Plan(operation, None, key)
        return Plan(operation, _model_and_document(operation, incoming)[0], key)
    operation = route(incoming.method, incoming.path)
    model, document = _model_and_document(operation, incoming)
    options = _stream_options_for_usage(operation, document) if stream_usage else None
    return Plan(operation, model, key, options)


def requested_model(operation: Operation, incoming: IncomingRequest) -> str | None:
    """The model the request names, where this operation names one; required for deployment operations."""
    return _model_and_document(operation, incoming)[0]


def _model_and_document(
    operation: Operation, incoming: IncomingRequest
) -> tuple[str | None, dict[str, Any] | None]:
    required = operation.requires_model
    if operation.model_in is ModelIn.JSON:
        if not required and (incoming.method != "POST" or not incoming.body):
            return None, None  # reads, deletes and body-less actions (cancel) name no model
        _check_json_content_type(incoming.headers)
        document = bodies.json_document(incoming.body)
        return bodies.model_in(document, required=required), document
    if operation.model_in is ModelIn.FORM:
        field = bodies.form_field(incoming.body, incoming.headers.get("Content-Type", ""), "model")
        if field is None:
            raise BadRequest(
                "You must provide a model parameter (a form field).", param="model", code="missing_model"
            )
        return field.value, None
    if operation.model_in is ModelIn.QUERY:
        model = incoming.query.get("model")
        if not model and required:
            raise BadRequest("You must provide a model query parameter.", param="model", code="missing_model")
        return model or None, None
    if operation.model_in is ModelIn.SESSION:
        _check_json_content_type(incoming.headers)
        document = bodies.json_document(incoming.body)
        session = document.get("session")
        if isinstance(session, dict) and "model" in session:
            return bodies.model_in(session, required=False), document
        return bodies.model_in(document, required=False), document
    return None, None


def responses_socket(operation: Operation, incoming: IncomingRequest) -> bool:
    """The Responses API over WebSocket: `GET /v1/responses` asking for an upgrade."""
    return (
        operation.name == "responses"
        and incoming.method == "GET"
        and operation_path(incoming.path) == "responses"
        and incoming.headers.get("Upgrade", "").lower() == "websocket"
    )


def _check_json_content_type(headers: CIMultiDictProxy[str]) -> None:
    """JSON, or no Content-Type at all: a page's `text/plain`, form or multipart POST needs no CORS preflight,
    so it must never be read as JSON and sent on."""
    content_type = headers.get("Content-Type")
    if content_type is None or content_type.partition(";")[0].strip().lower() == "application/json":
        return
    raise UnsupportedMediaType(
        "This operation takes a JSON body: send 'Content-Type: application/json'.",
        param="Content-Type",
        code="unsupported_media_type",
    )


def _stream_options_for_usage(operation: Operation, document: dict[str, Any] | None) -> str | None:
    """New `stream_options` for a stream that did not ask for usage; None when nothing is to change."""
    if not operation.streams_usage or document is None or document.get("stream") is not True:
        return None
    options = document.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return None  # Azure refuses it anyway, with its own message
    if options is not None and options.get("include_usage") is True:
        return None
    return json.dumps((options or {}) | {"include_usage": True}, separators=(",", ":"))


def to_upstream(
    plan: Plan, incoming: IncomingRequest, backend: Backend, credential: Mapping[str, str] | None = None
) -> UpstreamRequest:
    """The request for `backend`. `credential` holds the server-side auth headers; None forwards the client's key."""
    if backend.kind is Mode.OPENAI or plan.operation is None:
        url = URL(backend.origin + incoming.raw_path, encoded=True)
        headers = copy_headers(incoming.headers, CLIENT_CREDENTIALS if credential else HOP_BY_HOP)
        headers.update(credential or {})
        return _as_sent(incoming, UpstreamRequest(incoming.method, url, headers, incoming.body))
    operation = plan.operation
    if credential is None:
        if not plan.client_key:
            raise Unauthorized(
                "No API key provided. Send it as 'Authorization: Bearer KEY' or 'api-key: KEY'.",
                code="missing_api_key",
            )
        credential = {backend.api_key_header: plan.client_key}
    deployment = deployment_for(plan.model, backend) if plan.model is not None else None
    headers = copy_headers(incoming.headers, NOT_FOR_AZURE)
    socket = operation.websocket or responses_socket(operation, incoming)
    if socket:  # the bridge makes its own handshake; the client's may carry its key
        headers = CIMultiDict(
            (k, v) for k, v in headers.items() if not k.lower().startswith("sec-websocket-")
        )
    if operation.name == "realtime/calls" and credential.get("api-key", "").startswith(EPHEMERAL_PREFIX):
        credential = {"Authorization": f"Bearer {credential['api-key']}"}  # Azure reads ek_ keys as bearers
    headers.popall(backend.api_key_header, None)  # a client's own copy of the key header never passes
    headers.update(credential)
    if incoming.request_id is not None:
        headers["x-ms-client-request-id"] = incoming.request_id
    if socket and not operation.websocket:
        url = v1_url(backend, operation, incoming, None)
        rewrite = False  # each `response.create` frame names its model: the bridge maps those
    elif backend.style is ApiStyle.V1 or operation.v1_only:
        url = v1_url(backend, operation, incoming, deployment)
        rewrite = operation.model_in is not ModelIn.QUERY and not operation.names_base_model
    else:
        url = classic_url(backend, operation, incoming, deployment)
        rewrite = operation.model_is_deployment
    body = _with_deployment(incoming, operation, plan.model, deployment) if rewrite else incoming.body
    if plan.stream_options is not None:
        body = bodies.set_member(body, "stream_options", plan.stream_options)
    return _as_sent(incoming, UpstreamRequest(incoming.method, url, headers, body))


def _as_sent(incoming: IncomingRequest, request: UpstreamRequest) -> UpstreamRequest:
    """A compressed body goes on exactly as the client sent it, header and bytes, unless the translation
    changed it; the changed body, made from the decoded copy, then goes without `Content-Encoding`."""
    if incoming.sent_body is None:
        return request
    if request.body is incoming.body:
        return UpstreamRequest(request.method, request.url, request.headers, incoming.sent_body)
    request.headers.popall("Content-Encoding", None)
    return request


def route(method: str, path: str) -> Operation:
    operation = find_operation(path)
    if operation is None:
        raise NotFound(
            f"Unknown request URL: {method} {path}. azproxy does not serve this operation.",
            code="unknown_url",
        )
    if operation.scope is Scope.DEPLOYMENT:
        allowed = "GET" if operation.websocket else "POST"
        if method != allowed:
            raise MethodNotAllowed(
                f"{method} is not allowed on {path}; use {allowed}.",
                code="method_not_allowed",
                headers={"Allow": allowed},
            )
    return operation


def deployment_for(model: str | None, backend: Backend) -> str:
    """The mapped deployment, or the model name itself; refused when it could not be a single path segment."""
    if model is None:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    deployment = backend.model_map.get(model, model)
    if not _DEPLOYMENT_NAME.fullmatch(deployment):
        raise BadRequest(
            f"Model {model!r} maps to deployment {deployment!r}, which is not a valid Azure deployment name "
            "(letters, digits, '.', '_', '-', ':'; at most 256 characters).",
            param="model",
            code="invalid_model",
        )
    return deployment


def classic_url(
    backend: Backend, operation: Operation, incoming: IncomingRequest, deployment: str | None
) -> URL:
    """`{endpoint}/openai/deployments/{deployment}/{op}` or `{endpoint}/openai/{path}`, with one api-version."""
    if not incoming.query and operation.scope is Scope.DEPLOYMENT and not operation.websocket:
        # The common case, built as one string: api-versions are URL-safe tokens (config checks them).
        path = f"/openai/deployments/{deployment}/{operation.name}"
        return URL(f"{backend.origin}{path}?api-version={api_version_for(operation, backend)}", encoded=True)
    params = MultiDict(incoming.query)
    version = params.getone("api-version", "") or api_version_for(operation, backend)
    params.popall("api-version", None)
    if operation.websocket:
        params.popall("model", None)
        params["deployment"] = deployment or ""
        path = "/openai/realtime"
    elif operation.scope is Scope.DEPLOYMENT:
        path = f"/openai/deployments/{deployment}/{operation.name}"
    else:
        path = "/openai/" + resource_path(incoming)
    params["api-version"] = version
    return URL(backend.origin + path, encoded=True).with_query(params)


def v1_url(backend: Backend, operation: Operation, incoming: IncomingRequest, deployment: str | None) -> URL:
    """`{endpoint}/openai/v1/{path}`: no deployment in the path, api-version only if the client sent one."""
    url = URL(backend.origin + "/openai/v1/" + resource_path(incoming), encoded=True)
    if operation.model_in is not ModelIn.QUERY or (not operation.websocket and deployment is None):
        return url.with_query(incoming.query)
    params = MultiDict(incoming.query)
    params["model"] = deployment or ""
    return url.with_query(params)


def api_version_for(operation: Operation, backend: Backend) -> str:
    """An override for the operation, else the default when the operation accepts it, else what it needs."""
    override = backend.version_overrides.get(operation.name)
    if override:
        return override
    need = operation.need
    if need is None or need.accepts(backend.api_version):
        return backend.api_version
    return need.fallback


def _with_deployment(
    incoming: IncomingRequest, operation: Operation, model: str | None, deployment: str | None
) -> bytes:
    """The body with its model replaced by the deployment name, every other byte as sent."""
    if model is None or deployment is None or deployment == model:
        return incoming.body
    if operation.model_in is ModelIn.FORM:
        field = bodies.form_field(incoming.body, incoming.headers.get("Content-Type", ""), "model")
        return bodies.replace_span(incoming.body, field, deployment) if field else incoming.body
    if operation.model_in is ModelIn.SESSION:  # `session.model`, else the top-level one (as it was read)
        nested = bodies.replace_nested_model(incoming.body, "session", deployment)
        if nested != incoming.body:
            return nested
    return bodies.replace_json_model(incoming.body, deployment)


def resource_path(incoming: IncomingRequest) -> str:
    """The operation path as the client encoded it (`files/file-abc/content`); a segment that would climb or
    split the path once decoded (`..`, `%2F`) is refused, so an id can never reach another Azure path."""
    raw = operation_path(incoming.raw_path.partition("?")[0])
    for segment in raw.split("/"):
        decoded = unquote(segment)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise BadRequest(f"The path segment {segment!r} is not allowed.", code="invalid_path")
    return raw
