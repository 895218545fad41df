"""The table of OpenAI operations azproxy translates: where Azure serves each one, where its model is named,
and which api-version it needs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Final


class Scope(Enum):
    """Where Azure serves an operation: under a deployment, or on the resource itself."""

    DEPLOYMENT = "deployment"
    RESOURCE = "resource"


class ModelIn(Enum):
    """Where the request names its model."""

    JSON = "json"  # the JSON body's top-level `model`
    FORM = "form"  # a multipart form field `model`
    QUERY = "query"  # the `model` query parameter (realtime)
    SESSION = (
        "session"  # the JSON body's `session.model`, else its top-level `model` (realtime client secrets)
    )
    NOWHERE = "nowhere"


@dataclass(frozen=True, slots=True)
class VersionNeed:
    """The api-version an operation needs: from `since` on, previews only if so; `fallback` when the
    configured default does not qualify (dates from Azure's REST specs)."""

    since: str
    preview_only: bool = False
    fallback: str = "2025-04-01-preview"

    def accepts(self, version: str) -> bool:
        return version[:10] >= self.since and (not self.preview_only or version.endswith("-preview"))


@dataclass(frozen=True, slots=True)
class Operation:
    """One OpenAI operation family. `name` is its path after `/v1/` (resource families: the first segment)."""

    name: str
    scope: Scope
    model_in: ModelIn
    #: A resource operation whose body names a model that Azure reads as a deployment (Responses, assistants).
    model_is_deployment: bool = False
    #: The body's model is a base model to train, never a deployment (fine-tuning), so it is sent as named.
    names_base_model: bool = False
    #: Streams of this operation can report usage when asked (`stream_options.include_usage`).
    streams_usage: bool = False
    need: VersionNeed | None = None
    websocket: bool = False
    #: Azure serves it only on its v1 API (`/openai/v1/...`), whichever URL style the backend uses.
    v1_only: bool = False

    @property
    def requires_model(self) -> bool:
        return self.scope is Scope.DEPLOYMENT


_PREVIEW_ASSISTANTS: Final = VersionNeed("2024-05-01", preview_only=True)

_OPERATIONS: Final = (
    Operation("chat/completions", Scope.DEPLOYMENT, ModelIn.JSON, streams_usage=True),
    Operation("completions", Scope.DEPLOYMENT, ModelIn.JSON, streams_usage=True),
    Operation("embeddings", Scope.DEPLOYMENT, ModelIn.JSON),
    Operation("images/generations", Scope.DEPLOYMENT, ModelIn.JSON),
    Operation("images/edits", Scope.DEPLOYMENT, ModelIn.FORM, need=VersionNeed("2025-04-01")),
    Operation("images/variations", Scope.DEPLOYMENT, ModelIn.FORM, need=VersionNeed("2025-04-01")),
    Operation("audio/transcriptions", Scope.DEPLOYMENT, ModelIn.FORM),
    Operation("audio/translations", Scope.DEPLOYMENT, ModelIn.FORM),
    Operation("audio/speech", Scope.DEPLOYMENT, ModelIn.JSON),
    Operation(
        "realtime", Scope.DEPLOYMENT, ModelIn.QUERY, need=VersionNeed("2024-10-01", True), websocket=True
    ),
    # WebRTC's two HTTP steps; the media then flows between the client and Azure, never through a proxy.
    Operation("realtime/client_secrets", Scope.RESOURCE, ModelIn.SESSION, v1_only=True),
    Operation("realtime/calls", Scope.RESOURCE, ModelIn.QUERY, v1_only=True),
    Operation("files", Scope.RESOURCE, ModelIn.NOWHERE),
    Operation(
        "batches", Scope.RESOURCE, ModelIn.NOWHERE, need=VersionNeed("2024-07-01", fallback="2024-10-21")
    ),
    Operation("fine_tuning", Scope.RESOURCE, ModelIn.JSON, names_base_model=True),
    Operation("models", Scope.RESOURCE, ModelIn.NOWHERE),
    Operation("assistants", Scope.RESOURCE, ModelIn.JSON, model_is_deployment=True, need=_PREVIEW_ASSISTANTS),
    Operation("threads", Scope.RESOURCE, ModelIn.JSON, model_is_deployment=True, need=_PREVIEW_ASSISTANTS),
    Operation("vector_stores", Scope.RESOURCE, ModelIn.NOWHERE, need=_PREVIEW_ASSISTANTS),
    Operation(
        "responses",
        Scope.RESOURCE,
        ModelIn.JSON,
        model_is_deployment=True,
        need=VersionNeed("2025-03-01", True),
    ),
)

OPERATIONS: Final[Mapping[str, Operation]] = MappingProxyType({op.name: op for op in _OPERATIONS})


def operation_path(path: str) -> str:
    """The operation part of a client path: `/v1/chat/completions` and `/chat/completions` alike."""
    return path.removeprefix("/v1/") if path.startswith("/v1/") else path.lstrip("/")


def find_operation(path: str) -> Operation | None:
    """Deployment operations match their whole path; resource operations their first segment (ids follow)."""
    relative = operation_path(path)
    operation = OPERATIONS.get(relative)
    if operation is not None:
        return operation
    operation = OPERATIONS.get(relative.partition("/")[0])
    return operation if operation is not None and operation.scope is Scope.RESOURCE else None
