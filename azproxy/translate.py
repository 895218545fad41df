"""The translator: pure functions from an incoming OpenAI-shaped request to the request a backend receives.

No I/O here. `plan_request` reads the request once (route, model, client key); `to_upstream` turns that plan into
the exact URL, headers and body for one backend, so a retry on another backend reuses the plan. Two URL styles:
classic (`/openai/deployments/{deployment}/...?api-version=V`) and Azure's v1 (`/openai/v1/...`, the body's
model naming the deployment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiMapping
from yarl import URL

from . import bodies
from .backends import Backend
from .config import ApiStyle, Mode
from .errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from .operations import ModelIn, Operation, Scope, find_operation, operation_path

#: Connection-level headers (RFC 9110 7.6.1) and those a proxy owns; never copied from one hop to the next.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)

_CLIENT_CREDENTIALS: Final = HOP_BY_HOP | frozenset({"authorization", "api-key"})

#: Client headers Azure has no use for: OpenAI's credentials and account routing, and browser cookies.
NOT_FOR_AZURE: Final = _CLIENT_CREDENTIALS | frozenset({"openai-organization", "openai-project", "cookie"})

#: A WebSocket subprotocol carrying the client's key (browsers): never echoed, logged or sent upstream.
KEY_SUBPROTOCOL: Final = "openai-insecure-api-key."

#: Azure deployment names are letters, digits, `.`, `_`, `-`; OpenAI fine-tune ids add `:`. Nothing that can
#: leave the path segment (`/`, `?`, `#`, `%`, `..`, controls) gets through.
_DEPLOYMENT_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,255}")


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


@dataclass(frozen=True, slots=True)
class Plan:
    """What the request asks for, independent of the backend that will serve it."""

    operation: Operation | None
    model: str | None
    client_key: str | None


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes


def plan_request(incoming: IncomingRequest, mode: Mode) -> Plan:
    """Route and read the request once. openai mode relays any path, so it needs nothing from the body."""
    if mode is Mode.OPENAI:
        return Plan(None, None, None)
    operation = route(incoming.method, incoming.path)
    return Plan(operation, requested_model(operation, incoming), client_key(incoming.headers))


def requested_model(operation: Operation, incoming: IncomingRequest) -> str | None:
    """The model the request names, where this operation names one; required for deployment operations."""
    required = operation.requires_model
    if operation.model_in is ModelIn.JSON:
        if not required and (incoming.method != "POST" or not incoming.body):
            return None  # reads, deletes and body-less actions (cancel) name no model

        return bodies.model_in(bodies.json_document(incoming.body), required=required)
    if operation.model_in is ModelIn.FORM:
        field = bodies.form_field(incoming.body, incoming.headers.get("Content-Type", ""), "model")
        if field is None:
            raise BadRequest(
                "You must provide a model parameter (a form field).", param="model", code="missing_model"
            )
        return field.value
    if operation.model_in is ModelIn.QUERY:
        model = incoming.query.get("model")
        if not model:
            raise BadRequest("You must provide a model query parameter.", param="model", code="missing_model")
        return model
    return None


def to_upstream(
    plan: Plan, incoming: IncomingRequest, backend: Backend, credential: Mapping[str, str] | None = None
) -> UpstreamRequest:
    """The request for `backend`. `credential` holds the server-side auth headers; None forwards the client's key."""
    if backend.kind is Mode.OPENAI or plan.operation is None:
        url = URL(backend.origin + incoming.raw_path, encoded=True)
        headers = copy_headers(incoming.headers, _CLIENT_CREDENTIALS if credential else HOP_BY_HOP)
        headers.update(credential or {})
        return UpstreamRequest(incoming.method, url, headers, incoming.body)
    operation = plan.operation
    if credential is None:
        if not plan.client_key:
            raise Unauthorized(
                "No API key provided. Send it as 'Authorization: Bearer KEY' or 'api-key: KEY'.",
                code="missing_api_key",
            )
        credential = {"api-key": plan.client_key}
    deployment = deployment_for(plan.model, backend) if plan.model is not None else None
    headers = copy_headers(incoming.headers, NOT_FOR_AZURE)
    if operation.websocket:  # the bridge makes its own handshake; the client's may carry its key
        headers = CIMultiDict(
            (k, v) for k, v in headers.items() if not k.lower().startswith("sec-websocket-")
        )
    headers.update(credential)
    if backend.style is ApiStyle.V1:
        url = v1_url(backend, operation, incoming, deployment)
        rewrite = operation.model_in is not ModelIn.QUERY and operation.name != "fine_tuning"
    else:
        url = classic_url(backend, operation, incoming, deployment)
        rewrite = operation.model_is_deployment
    body = _with_deployment(incoming, operation, plan.model, deployment) if rewrite else incoming.body
    return UpstreamRequest(incoming.method, url, headers, body)


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
    if not operation.websocket:
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


def client_key(headers: CIMultiDictProxy[str]) -> str | None:
    """`Authorization: Bearer KEY`, `api-key: KEY`, or (browsers opening a realtime WebSocket, which cannot set
    headers) the subprotocol `openai-insecure-api-key.KEY`."""
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    key = headers.get("api-key")
    if key:
        return key
    for protocol in headers.get("Sec-WebSocket-Protocol", "").split(","):
        if protocol.strip().startswith(KEY_SUBPROTOCOL):
            return protocol.strip().removeprefix(KEY_SUBPROTOCOL) or None
    return None


def copy_headers(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    """Every header but the dropped ones, nor those `Connection` names (copy, then delete: the C-level
    multidict does this several times faster than filtering in Python, and this runs twice per request)."""
    copy = CIMultiDict(headers)
    for name in dropped:
        if name in copy:
            del copy[name]
    for name in headers.get("Connection", "").split(","):
        copy.popall(name.strip(), None)
    return copy
