"""The bodies the emulator answers with, shaped like Azure OpenAI's (filter results, Azure model names, usage)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from typing import Any, Final

SAFE: Final[dict[str, Any]] = {
    category: {"filtered": False, "severity": "safe"}
    for category in ("hate", "self_harm", "sexual", "violence")
}
#: A prompt holding this word is refused the way Azure's content filter refuses one.
FILTER_TRIGGER: Final = "__content_filter__"
#: With the asynchronous filter, an annotation chunk follows every this many content chunks (and one ends the text).
ANNOTATION_EVERY: Final = 3


def prompt_filter_results() -> list[dict[str, Any]]:
    return [{"prompt_index": 0, "content_filter_results": SAFE}]


def prompt_text(body: dict[str, Any]) -> str:
    """The last user message (chat) or the prompt (completions), as plain text."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
                return str(content)
        return ""
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def answer_pieces(body: dict[str, Any], chunks: int | None) -> list[str]:
    """The answer, cut into the pieces a stream sends: an echo of the prompt, or `w0 `, `w1 `... when counted."""
    if chunks is not None:
        return [f"w{i} " for i in range(chunks)]
    words = f"Hello from the Azure OpenAI emulator. You said: {prompt_text(body)}".split()
    return [word + " " for word in words[:-1]] + words[-1:]


def usage(body: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt_tokens = max(1, len(prompt_text(body).split()))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(body: dict[str, Any], model: str, pieces: list[str]) -> dict[str, Any]:
    return {
        "id": _id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_emulator",
        "prompt_filter_results": prompt_filter_results(),
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "logprobs": None,
                "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                "content_filter_results": SAFE,
            }
        ],
        "usage": usage(body, len(pieces)),
    }


def text_completion(body: dict[str, Any], model: str, pieces: list[str]) -> dict[str, Any]:
    return {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "prompt_filter_results": prompt_filter_results(),
        "choices": [
            {
                "index": 0,
                "text": "".join(pieces),
                "finish_reason": "stop",
                "logprobs": None,
                "content_filter_results": SAFE,
            }
        ],
        "usage": usage(body, len(pieces)),
    }


def chat_stream(
    body: dict[str, Any], model: str, pieces: list[str], *, async_filter: bool = False
) -> Iterator[dict[str, Any]]:
    """Azure's chat stream: the filter-only chunk (empty `choices`), role, content, finish, optional usage.

    Asked for usage (`stream_options.include_usage`), every other chunk carries `"usage": null` and a last
    chunk with empty `choices` carries it (OpenAI's API reference, stream_options; Azure's chat completion
    chunk schema in the data-plane REST spec has the same nullable `usage`).

    With the asynchronous filter (Azure's "Content streaming" concept page, "Asynchronous filtering"), content
    chunks come unfiltered, without `content_filter_results`, and annotation chunks follow them: a choice with
    only `index`, `finish_reason: null`, `content_filter_offsets` (character offsets into the text so far) and
    `content_filter_results`, under the blank `id`/`model`/`object` of the filter-only chunk. The last
    annotation comes after the finish chunk, as Azure's filter lags the text.
    """
    head = {
        "id": _id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_emulator",
    } | _null_usage(body)
    yield {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": prompt_filter_results(),
    }
    yield head | {"choices": [_delta({"role": "assistant", "content": ""}, None, {})]}
    checked = sent = 0
    for number, piece in enumerate(pieces, 1):
        if not async_filter:
            yield head | {"choices": [_delta({"content": piece}, None, SAFE)]}
            continue
        yield head | {"choices": [_delta({"content": piece}, None, None)]}
        sent += len(piece)
        if number % ANNOTATION_EVERY == 0 and number < len(pieces):
            yield _annotation(checked, sent)
            checked = sent
    yield head | {"choices": [_delta({}, "stop", {} if not async_filter else None)]}
    if async_filter and checked < sent:
        yield _annotation(checked, sent)
    if _wants_usage(body):
        yield head | {"choices": [], "usage": usage(body, len(pieces))}


def completion_stream(body: dict[str, Any], model: str, pieces: list[str]) -> Iterator[dict[str, Any]]:
    head = {
        "id": _id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    } | _null_usage(body)
    yield {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": prompt_filter_results(),
    }
    for piece in pieces:
        yield head | {
            "choices": [
                {
                    "index": 0,
                    "text": piece,
                    "finish_reason": None,
                    "logprobs": None,
                    "content_filter_results": SAFE,
                }
            ]
        }
    yield head | {"choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]}
    if _wants_usage(body):
        yield head | {"choices": [], "usage": usage(body, len(pieces))}


def embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    """One deterministic vector per input, as floats or as base64 little-endian float32 (the SDK's default)."""
    raw = body.get("input")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    asked = body.get("dimensions")
    dimensions = asked if isinstance(asked, int) and 0 < asked <= 4096 else 16
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = _vector(json.dumps(item), dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(len(json.dumps(item).split()) for item in inputs)
    return {
        "object": "list",
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def content_filter_refusal() -> dict[str, Any]:
    filtered = SAFE | {"violence": {"filtered": True, "severity": "high"}}
    return {
        "error": {
            "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
            "policy. Please modify your prompt and retry.",
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": filtered},
        }
    }


def content_span(events: list[dict[str, Any]]) -> int:
    """How many of `events` (from the first content chunk on) run up to the last one carrying content."""
    last = 0
    for index, event in enumerate(events):
        for choice in event.get("choices") or ():
            if choice.get("delta", {}).get("content") or choice.get("text"):
                last = index + 1
    return last


def _annotation(start: int, end: int) -> dict[str, Any]:
    """An asynchronous-filter annotation of the text between character offsets `start` and `end`."""
    offsets = {"check_offset": start, "start_offset": start, "end_offset": end}
    choice = {
        "index": 0,
        "finish_reason": None,
        "content_filter_offsets": offsets,
        "content_filter_results": SAFE,
    }
    return {"choices": [choice], "created": 0, "id": "", "model": "", "object": ""}


def _delta(delta: dict[str, Any], finish: str | None, filters: dict[str, Any] | None) -> dict[str, Any]:
    """A chat chunk's choice; `filters` None leaves `content_filter_results` out (asynchronous filter)."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return choice if filters is None else choice | {"content_filter_results": filters}


def _null_usage(body: dict[str, Any]) -> dict[str, None]:
    return {"usage": None} if _wants_usage(body) else {}


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _vector(text: str, dimensions: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i % len(digest)] - 128) / 128, 6) for i in range(dimensions)]


def _id(prefix: str) -> str:
    return f"{prefix}-{hashlib.sha1(str(time.monotonic_ns()).encode()).hexdigest()[:24]}"
