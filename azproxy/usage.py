"""Token usage: one `TokenUsage` for every answer, read from plain answers and streams as they pass, and the one
seam through which whoever needs it (rate limits now, metrics and logs too) is told.

Chat and completions report `usage.prompt_tokens`/`completion_tokens`, embeddings only prompt tokens, the
Responses API `input_tokens`/`output_tokens` (under `response` in its stream's `response.completed`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .clients import Client

log = logging.getLogger(__name__)

#: A usage object (not `"usage": null`, which streams asked for usage carry on every other chunk).
_USAGE_OBJECT: Final = re.compile(rb'"usage"\s*:\s*\{')
#: The `"usage": null` member OpenAI and Azure add to every chunk of a stream asked for usage.
_NULL_USAGE: Final = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_EVENT_END: Final = re.compile(rb"\r?\n\r?\n")
_DECODER: Final = json.JSONDecoder()
#: Bytes an estimate counts as one token (OpenAI's rule of thumb for English text).
BYTES_PER_TOKEN: Final = 4


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Tokens an answer used; all None when it reported none. `estimated` marks azproxy's own guess."""

    prompt: int | None = None
    completion: int | None = None
    total: int | None = None
    estimated: bool = False

    @property
    def reported(self) -> bool:
        return self.total is not None

    @classmethod
    def from_document(cls, document: object) -> TokenUsage | None:
        """The usage of an answer or stream event (top level or under `response`), None when it has none."""
        if not isinstance(document, dict):
            return None
        usage = document.get("usage")
        if not isinstance(usage, dict):
            return cls.from_document(document.get("response"))
        prompt = _count(usage, "prompt_tokens", "input_tokens")
        completion = _count(usage, "completion_tokens", "output_tokens")
        total = _count(usage, "total_tokens")
        if total is None and prompt is None and completion is None:
            return None
        if total is None:
            total = (prompt or 0) + (completion or 0)
        return cls(prompt, completion if completion is not None or prompt is None else 0, total)

    @classmethod
    def estimate(cls, prompt_bytes: int, completion_events: int) -> TokenUsage:
        """For a stream the client left before Azure reported usage: the request body's bytes / 4 as prompt,
        one token per content event relayed as completion."""
        prompt = -(-prompt_bytes // BYTES_PER_TOKEN)
        return cls(prompt, completion_events, prompt + completion_events, estimated=True)


NO_USAGE: Final = TokenUsage()


def _count(usage: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def usage_in_json(body: bytes) -> TokenUsage:
    """The usage of a whole JSON answer. `usage` comes last in Azure's answers, so the object after the last
    `"usage":` is decoded alone; anything unusual falls back to parsing the whole body."""
    start = body.rfind(b'"usage"')
    match = _USAGE_OBJECT.match(body, start) if start >= 0 else None
    if match is not None:
        try:
            document, _ = _DECODER.raw_decode(body[match.end() - 1 :].decode())
            found = TokenUsage.from_document({"usage": document})
            if found is not None:
                return found
        except (ValueError, RecursionError):
            pass
    try:
        return TokenUsage.from_document(json.loads(body)) or NO_USAGE
    except (ValueError, RecursionError):
        return NO_USAGE


@dataclass(frozen=True, slots=True)
class Metered:
    """What a usage observer learns of one answer."""

    client: Client | None
    model: str | None
    usage: TokenUsage


UsageObserver = Callable[[Metered], None]


class UsageObservers:
    """The one seam for token usage: the pipeline reports each answer once; observers must not block (an
    observer with I/O to do schedules it)."""

    def __init__(self) -> None:
        self._observers: list[UsageObserver] = []

    def add(self, observer: UsageObserver) -> None:
        self._observers.append(observer)

    def observe(self, metered: Metered) -> None:
        for observer in self._observers:
            try:
                observer(metered)
            except Exception:  # one broken observer must not fail the answer or starve the others
                log.exception("usage observer %r failed", observer)


class StreamMeter:
    """Reads the usage an SSE stream reports as it passes.

    With `hide_usage` (azproxy itself asked Azure for usage), it also takes out what the client did not ask
    for: the final usage-only chunk and the `"usage": null` on every other chunk; events are then passed on
    whole, a partial one held until its end arrives (up to `MAX_PENDING` bytes, past which it goes out as is).
    """

    MAX_PENDING: Final = 1024 * 1024

    def __init__(self, *, hide_usage: bool) -> None:
        self._hide = hide_usage
        self._pending = b""
        self.usage = NO_USAGE
        #: Events relayed that were not usage chunks (the basis of an estimate).
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        """What to send the client for this chunk."""
        data = self._pending + chunk if self._pending else chunk
        cut = _complete_events_end(data)
        complete, self._pending = data[:cut], data[cut:]
        if len(self._pending) > self.MAX_PENDING:
            complete, self._pending = data, b""
        self.events += complete.count(b"data:")
        if b'"usage"' in complete:
            complete = self._scan(complete)
        return complete if self._hide else chunk

    def finish(self) -> bytes:
        """The unterminated rest of the stream, if any (already sent when not hiding)."""
        rest, self._pending = self._pending, b""
        if b'"usage"' in rest:
            rest = self._scan(rest)
        return rest if self._hide else b""

    def _scan(self, events: bytes) -> bytes:
        if not _USAGE_OBJECT.search(events):  # the common chunk: only `"usage": null` members to take out
            return _NULL_USAGE.sub(b"", events) if self._hide else events
        pieces, position = [], 0
        for end in [*_EVENT_END.finditer(events), None]:
            stop = end.end() if end is not None else len(events)
            if stop <= position:
                continue
            event = events[position:stop]
            position = stop
            pieces.append(self._event(event))
        return b"".join(pieces)

    def _event(self, event: bytes) -> bytes:
        if _USAGE_OBJECT.search(event):
            document = _event_document(event)
            usage = TokenUsage.from_document(document)
            if usage is not None:
                self.usage = usage
                if self._hide and isinstance(document, dict) and document.get("choices") == []:
                    self.events -= event.count(b"data:")
                    return b""
        return _NULL_USAGE.sub(b"", event) if self._hide else event


def _complete_events_end(data: bytes) -> int:
    """Where the last complete event of `data` ends (0 if none): after `\\n\\n` or `\\r\\n\\r\\n`."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def _event_document(event: bytes) -> object:
    payload = b"\n".join(
        line.removesuffix(b"\r")[5:] for line in event.split(b"\n") if line.startswith(b"data:")
    )
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):
        return None
