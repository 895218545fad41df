"""Azure OpenAI's answers rewritten into OpenAI's shape, for clients that trip over the differences.

Azure adds `prompt_filter_results` and per-choice `content_filter_results`/`content_filter_offsets`, opens chat
streams with a chunk that has no choices, and names its own model (`gpt-35-turbo`) where OpenAI echoes the one
asked for. Used only when `AZPROXY_RESPONSE_SHAPE=openai`; streams are rewritten event by event, never buffered
beyond the event still arriving, and that only up to `EventReshaper.MAX_PENDING` bytes.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Final

log = logging.getLogger(__name__)

#: An event ends at an empty line; lines end with LF or CRLF.
_EVENT_END: Final = re.compile(rb"\n\r?\n")
#: An event holding neither is left alone without parsing (a loose test: a false hit only costs a parse).
_MARKERS: Final = (b'"model"', b"filter_")
_CHOICE_FILTERS: Final = ("content_filter_results", "content_filter_offsets")
_TOP_FILTERS: Final = ("prompt_filter_results", "content_filter_results")


#: Names the model that served a reshaped plain answer, where `model` now reports the one asked for
#: (model-router picks one per request). Streams cannot carry it: their head goes out before the first event.
SERVED_MODEL_HEADER: Final = "x-azproxy-served-model"


def reshape_json(body: bytes, client_model: str | None) -> bytes:
    """A plain (non-streamed) answer in OpenAI's shape.

    Non-JSON or non-object bodies, and bodies with nothing to change, come back unchanged (same bytes).
    """
    return reshape_answer(body, client_model)[0]


def reshape_answer(body: bytes, client_model: str | None) -> tuple[bytes, str | None]:
    """`reshape_json`, and the model the answer named where `client_model` replaced it (else None)."""
    if not _worth_parsing(body, 0, len(body)):
        return body, None
    document = _parse(body)
    served = document.get("model") if document is not None else None
    if document is None or not _reshape(document, client_model):
        return body, None
    replaced = isinstance(served, str) and served != document.get("model")
    return _dumps(document), served if replaced else None


class EventReshaper:
    """Rewrites an SSE stream event by event, as chunks arrive.

    An event still arriving is held up to `MAX_PENDING` bytes; a larger one goes out unchanged as it arrives
    (no real event is that large, so only a broken or hostile backend pays), and the next one is rewritten again.
    """

    MAX_PENDING: Final = 1024 * 1024

    def __init__(self, client_model: str | None) -> None:
        self._model = client_model
        self._pending = bytearray()
        #: Where the search for the next event end resumes: bytes before it hold no end.
        self._scan = 0
        #: The event arriving outgrew MAX_PENDING: it is passed on unchanged up to its end.
        self._passing = False

    def feed(self, chunk: bytes) -> bytes:
        """The rewritten form of every event completed by this chunk (b"" when none is complete yet)."""
        pending = self._pending
        pending += chunk
        start = 0
        if self._passing:
            first_end = _EVENT_END.search(pending, self._scan)
            if first_end is None:
                return self._pass_on()
            start = first_end.end()
            self._passing = False
        out: list[bytes | bytearray] = [pending[:start]]
        copied = start
        for end in _EVENT_END.finditer(pending, max(self._scan, start)):
            if _worth_parsing(pending, start, end.start()):
                rewritten = self._rewrite(bytes(pending[start : end.start()]))
                if rewritten is not None:
                    out.append(pending[copied:start])
                    out.append(rewritten + end[0] if rewritten else b"")
                    copied = end.end()
            start = end.end()
        out.append(pending[copied:start])
        del pending[:start]
        # An event end is at most 3 bytes long: only its first 2 can already be waiting here.
        self._scan = max(0, len(pending) - 2)
        if len(pending) > self.MAX_PENDING:
            log.warning("a stream event is larger than %d bytes; relayed unchanged", self.MAX_PENDING)
            self._passing = True
            out.append(self._pass_on())
        return b"".join(out)

    def finish(self) -> bytes:
        """Whatever is left at the end of the stream (an unterminated last event, rewritten if it parses)."""
        rest = bytes(self._pending)
        self._pending.clear()
        self._scan = 0
        passing, self._passing = self._passing, False
        rewritten = self._rewrite(rest) if not passing and _worth_parsing(rest, 0, len(rest)) else None
        return rest if rewritten is None else rewritten

    def _pass_on(self) -> bytes:
        """All of an oversized event that has arrived but its last 2 bytes (they may begin the event's end)."""
        cut = max(0, len(self._pending) - 2)
        passed = bytes(self._pending[:cut])
        del self._pending[:cut]
        self._scan = 0
        return passed

    def _rewrite(self, event: bytes) -> bytes | None:
        """One event without its ending: None when unchanged, b"" when dropped, else the rewritten event."""
        kept: list[bytes] = []
        data: list[bytes] = []
        slot = -1
        for line in event.split(b"\n"):
            field, _, value = line.removesuffix(b"\r").partition(b":")
            if field != b"data":
                kept.append(line)
                continue
            if slot < 0:
                slot = len(kept)
                kept.append(b"\r" if line.endswith(b"\r") else b"")
            data.append(value)  # JSON ignores the optional space after the colon
        document = _parse(b"\n".join(data)) if data else None
        if document is None:
            return None
        if _filter_only(document):
            return b""
        if not _reshape(document, self._model):
            return None
        kept[slot] = b"data: " + _dumps(document) + kept[slot]
        return b"\n".join(kept)


def _worth_parsing(data: bytes | bytearray, start: int, end: int) -> bool:
    return any(data.find(marker, start, end) >= 0 for marker in _MARKERS)


def _parse(payload: bytes) -> dict[str, Any] | None:
    """The JSON object in payload, or None for anything else (invalid JSON or UTF-8, arrays, too deep)."""
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _filter_only(chunk: dict[str, Any]) -> bool:
    """Azure's chunks that carry only filter results: the opening one (no choices, no usage), and the
    annotations of asynchronous filtering (choices holding nothing but an index and filter results)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or chunk.get("usage"):
        return False
    if not choices:
        return "prompt_filter_results" in chunk
    return all(isinstance(choice, dict) and _annotation_only(choice) for choice in choices)


def _annotation_only(choice: dict[str, Any]) -> bool:
    """True for a choice with filter results and otherwise only its index and nulls (no delta, no text)."""
    filters = [key for key in _CHOICE_FILTERS if key in choice]
    return bool(filters) and all(v is None for k, v in choice.items() if k != "index" and k not in filters)


def _reshape(document: dict[str, Any], model: str | None) -> bool:
    """Rewrites document in place into OpenAI's shape; True when anything changed."""
    choices = document.get("choices")
    if isinstance(choices, list):  # chat completions and completions, plain or chunk
        changed = _drop(document, ("prompt_filter_results",))
        for choice in choices:
            if isinstance(choice, dict):
                changed = _drop(choice, _CHOICE_FILTERS) or changed
        return _set_model(document, model) or changed
    kind = document.get("object")
    if kind == "list":  # embeddings
        return _set_model(document, model)
    if kind == "response":  # Responses API, plain
        return _drop(document, _TOP_FILTERS) | _set_model(document, model)
    response = document.get("response")
    if isinstance(response, dict):  # Responses API stream event
        changed = _drop(document, _TOP_FILTERS) | _set_model(document, model)
        return _drop(response, _TOP_FILTERS) | _set_model(response, model) | changed
    return False


def _drop(document: dict[str, Any], keys: tuple[str, ...]) -> bool:
    present = [key for key in keys if key in document]
    for key in present:
        del document[key]
    return bool(present)


def _set_model(document: dict[str, Any], model: str | None) -> bool:
    if model is None or "model" not in document or document["model"] == model:
        return False
    document["model"] = model
    return True
