"""The translator: pure functions from an incoming OpenAI-shaped request to the request a backend receives.

No I/O here. `plan_request` reads the request once (route, model, client key); `to_upstream` turns that plan into
the exact URL, headers and body for one backend, so a retry on another backend reuses the plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiMapping
from yarl import URL

from .backends import Backend
from .config import Mode
from .errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from .operations import BodyKind, Operation, Scope, find_operation

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
NOT_FOR_AZURE: Final = HOP_BY_HOP | frozenset(
    {"authorization", "api-key", "openai-organization", "openai-project", "cookie"}
)

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
    model = model_of(incoming.body) if operation.body is BodyKind.JSON else None
    return Plan(operation, model, client_key(incoming.headers))


def to_upstream(plan: Plan, incoming: IncomingRequest, backend: Backend) -> UpstreamRequest:
    if backend.kind is Mode.OPENAI or plan.operation is None:
        url = URL(backend.origin + incoming.raw_path, encoded=True)
        if backend.api_key is None:
            return UpstreamRequest(
                incoming.method, url, copy_headers(incoming.headers, HOP_BY_HOP), incoming.body
            )
        headers = copy_headers(incoming.headers, _CLIENT_CREDENTIALS)
        headers["Authorization"] = f"Bearer {backend.api_key.reveal()}"
        return UpstreamRequest(incoming.method, url, headers, incoming.body)
    key = backend.api_key.reveal() if backend.api_key else plan.client_key
    if not key:
        raise Unauthorized(
            "No API key provided. Send it as 'Authorization: Bearer KEY' or 'api-key: KEY'.",
            code="missing_api_key",
        )
    deployment = deployment_for(plan.model, backend) if plan.operation.scope is Scope.DEPLOYMENT else None
    headers = copy_headers(incoming.headers, NOT_FOR_AZURE)
    headers["api-key"] = key
    url = azure_url(backend, plan.operation, deployment, incoming.query)
    return UpstreamRequest(incoming.method, url, headers, incoming.body)


def route(method: str, path: str) -> Operation:
    operation = find_operation(path)
    if operation is None:
        raise NotFound(
            f"Unknown request URL: {method} {path}. azproxy does not serve this operation.",
            code="unknown_url",
        )
    if method not in operation.methods:
        allowed = ", ".join(sorted(operation.methods))
        raise MethodNotAllowed(
            f"{method} is not allowed on {path}; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    return operation


def model_of(body: bytes) -> str:
    """The body's top-level `model`, with an error that says what to fix when there is none."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    model = document.get("model")
    if model is None:
        raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string.", param="model", code="invalid_model")
    return model


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


def azure_url(
    backend: Backend, operation: Operation, deployment: str | None, query: MultiMapping[str]
) -> URL:
    """`{endpoint}/openai/deployments/{deployment}/{op}` with the client's query and exactly one api-version."""
    scope = f"/openai/deployments/{deployment}/" if deployment is not None else "/openai/"
    url = URL(backend.origin + scope + operation.path, encoded=True)
    if not query:
        return url.with_query({"api-version": backend.api_version})
    params = MultiDict(query)
    version = params.getone("api-version", "") or backend.api_version
    params.popall("api-version", None)
    params["api-version"] = version
    return url.with_query(params)


def client_key(headers: CIMultiDictProxy[str]) -> str | None:
    authorization = headers.get("Authorization")
    if authorization:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return credential.strip()
    return headers.get("api-key") or None


def copy_headers(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    """Every header but the dropped ones (names compared lower-cased), plus those `Connection` names."""
    connection_listed = headers.get("Connection", "")
    if connection_listed:
        dropped = dropped | {name.strip().lower() for name in connection_listed.split(",")}
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in dropped)
