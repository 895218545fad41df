"""The access log: one line per request from its `RequestRecord`, as JSON (for systemd and Docker, where stdout
is not a terminal) or as readable text. No header value, body, query string or secret is ever written."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any, Final

from .logs import TurnBatchingHandler
from .record import RequestRecord

log = logging.getLogger("azproxy.access")

#: The JSON fields, in the order they are written.
FIELDS: Final = (
    "time",
    "request_id",
    "client",
    "arrival",
    "method",
    "path",
    "target",
    "model",
    "deployment",
    "backend",
    "attempts",
    "status",
    "bytes_in",
    "bytes_out",
    "ttfb_ms",
    "duration_ms",
    "prompt_tokens",
    "completion_tokens",
    "stream",
    "chunks",
    "aborted",
    "error",
    "upstream_request_id",
)


def fields_of(record: RequestRecord, ended: float) -> dict[str, Any]:
    """The record as the log's fields; `ended` is the monotonic time the answer was over."""
    return {
        "time": datetime.datetime.fromtimestamp(record.wall_time, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "request_id": record.request_id,
        "client": record.client,
        "arrival": record.arrival,
        "method": record.method,
        "path": record.path,
        "target": record.target,
        "model": record.model,
        "deployment": record.deployment,
        "backend": record.backend,
        "attempts": record.attempts,
        "status": record.status,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "ttfb_ms": _ms(record.ttfb),
        "duration_ms": _ms(ended - record.started),
        "prompt_tokens": record.usage.prompt,
        "completion_tokens": record.usage.completion,
        "stream": record.stream,
        "chunks": record.chunks,
        "aborted": record.aborted,
        "error": record.error,
        "upstream_request_id": record.upstream_request_id,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def json_line(fields: dict[str, Any]) -> str:
    return _JSON.encode(fields)


def text_line(fields: dict[str, Any]) -> str:
    """`METHOD PATH STATUS DURATIONms` first, then every other fact that has a value, as key=value."""
    head = f"{fields['method']} {fields['target'] or fields['path']} {fields['status']} {fields['duration_ms']}ms"
    rest = " ".join(
        f"{name}={value}"
        for name, value in fields.items()
        if name not in ("time", "method", "path", "status", "duration_ms") and value not in (None, False, 0)
    )
    return f"{head} {rest}".rstrip()


class AccessLog:
    """Writes one line per finished request, in the configured format, when the access log is on. Where `azproxy
    serve` gave the access logger its batching handler, lines go to it directly (same format, a fraction of the
    cost of a LogRecord); anywhere else (an embedding program, tests) they are ordinary INFO records."""

    def __init__(self, *, enabled: bool, as_json: bool) -> None:
        self.enabled = enabled
        self._format = json_line if as_json else text_line
        self._direct = next((h for h in log.handlers if isinstance(h, TurnBatchingHandler)), None)

    def write(self, record: RequestRecord, ended: float) -> None:
        if not self.enabled or not log.isEnabledFor(logging.INFO):
            return
        line = self._format(fields_of(record, ended))
        if self._direct is not None:
            self._direct.write_info(log.name, line)
        else:
            log.info("%s", line)
