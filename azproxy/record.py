"""What one request did, filled in by each step of its path and read once at its end by the access log and the
metrics: one record per request, also for CONNECT tunnels, requests inside them, and streams the client left.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDictProxy

from .edge.aiohttp_seam import request_key
from .usage import NO_USAGE, TokenUsage

if TYPE_CHECKING:
    from .upstream import Sent

#: A client's own request id is kept only when it is this sane; anything else could forge log lines.
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass(slots=True)
class RequestRecord:
    """Facts about one request; every field has a value (or None) from the moment the head was read."""

    request_id: str
    method: str
    path: str
    #: When the request head was complete (`time.monotonic()`), the start of ttfb and duration.
    started: float
    arrival: str = "reverse"
    target: str | None = None
    client: str | None = None
    model: str | None = None
    deployment: str | None = None
    backend: str | None = None
    attempts: int = 0
    status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    #: Seconds from the head to the first byte of the answer sent; None while nothing was sent.
    ttfb: float | None = None
    stream: bool = False
    chunks: int = 0
    aborted: bool = False
    #: azproxy's error code, when it answered itself.
    error: str | None = None
    upstream_request_id: str | None = None
    usage: TokenUsage = NO_USAGE
    #: Seconds spent waiting for backends (connect to the status line); the rest is azproxy's own time.
    upstream_wait: float = 0.0
    #: The model the backend said served the request, where it differs (model-router deployments).
    served_model: str | None = None
    #: Wall-clock time of the head, for the log line.
    wall_time: float = field(default_factory=time.time)

    def answer_started(self) -> None:
        if self.ttfb is None:
            self.ttfb = time.monotonic() - self.started


def request_id_for(headers: CIMultiDictProxy[str]) -> str:
    """The client's `x-request-id` or `x-ms-client-request-id` when sane, otherwise a new one."""
    for name in ("x-request-id", "x-ms-client-request-id"):
        offered = headers.get(name)
        if offered and _SANE_REQUEST_ID.fullmatch(offered):
            return offered
    return _new_request_id()


def _new_request_id() -> str:
    """A random (version 4) UUID in its usual text form, made without building a UUID object (a few µs a
    request)."""
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


RECORD: Final = request_key("azproxy_record", RequestRecord)


def note_upstream(record: RequestRecord, sent: Sent, model: str | None, waited: float) -> None:
    """What the upstream step learned: which backend answered, after how many attempts, under which id."""
    backend = sent.backend
    record.backend = backend.name
    record.attempts = sent.attempts
    record.deployment = backend.model_map.get(model, model) if model is not None else None
    record.upstream_wait += waited
    headers = sent.response.headers
    record.upstream_request_id = headers.get("apim-request-id") or headers.get("x-request-id")
