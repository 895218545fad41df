"""What every handler works with: the call it answers, Azure's error shape and headers, and streamed answers."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from multidict import MultiMapping

from .multipart import Form

_RESPONSE_HEADERS: Final = {
    "x-ms-region": "East US",
    "x-ratelimit-remaining-requests": "119",
    "x-ratelimit-remaining-tokens": "119000",
    "azureml-model-session": "emulator",
}


class AzureError(Exception):
    """Raised by handlers; answered as Azure's `{"error": {"code", "message"}}` with the given status."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def response(self) -> web.Response:
        error = {"code": self.code, "message": self.message} | self.extra
        return json_answer({"error": error}, status=self.status)


def not_found(kind: str, object_id: str) -> AzureError:
    return AzureError(404, "NotFound", f"{kind} with id '{object_id}' was not found.")


def bad_request(message: str, param: str | None = None) -> AzureError:
    return AzureError(400, "BadRequest", message, **({"param": param} if param else {}))


def headers() -> dict[str, str]:
    request_id = str(uuid.uuid4())
    return _RESPONSE_HEADERS | {"apim-request-id": request_id, "x-request-id": request_id}


def json_answer(document: Any, status: int = 200) -> web.Response:
    return web.json_response(document, status=status, headers=headers())


@dataclass(frozen=True, slots=True)
class Stream:
    """An answer sent piece by piece; the emulator paces it, holds it at its gate and counts it.

    `content` says which pieces carry generated content: the gate holds after the first, the delay follows each.
    `trailer` ends the stream (`data: [DONE]`) and is not counted as a chunk.
    """

    pieces: Iterable[bytes]
    content_type: str
    content: range
    trailer: bytes = b""


Answer = web.StreamResponse | Stream


def sse(data: Any, event: str | None = None) -> bytes:
    """One server-sent event; named events (`event: thread.run.created`) are how Assistants and Responses stream."""
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a handler sees it: already recorded, authenticated and version-checked."""

    request: web.Request
    body: bytes
    form: Form | None
    #: True on the v1 surface (`/openai/v1/...`), where bodies name the deployment.
    v1: bool
    #: Content pieces per generated answer (x-emulator-chunks, else the emulator's setting); None: one per word.
    chunks: int | None
    #: Chat streams carry Azure's asynchronous-filter annotations (the emulator's `async_filter` switch).
    async_filter: bool = False

    @property
    def query(self) -> MultiMapping[str]:
        return self.request.query

    def arg(self, name: str) -> str:
        return self.request.match_info[name]

    def json(self) -> dict[str, Any]:
        """The JSON object body; an empty body reads as `{}` (cancel and delete calls send none)."""
        if not self.body.strip():
            return {}
        try:
            document = json.loads(self.body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise AzureError(400, "BadRequest", "Could not parse the request body as JSON.")
        return document

    def multipart(self) -> Form:
        if self.form is None:
            raise bad_request("The request body must be multipart/form-data.")
        return self.form


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A resource-scoped operation: served at `/openai/{path}` and, unless `v1` is False, `/openai/v1/{path}`."""

    method: str
    path: str
    #: The key of its api-version minimum in `versions.MINIMUMS`.
    operation: str
    handler: Callable[[Call], Answer]
    v1: bool = True
