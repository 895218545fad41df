"""Azure answers rewritten into OpenAI's shape: plain bodies and SSE streams, fed in every possible way."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from azproxy.emulator import answers
from azproxy.emulator.responses import _response, _stream
from azproxy.shape import EventReshaper, reshape_json

ASKED = "gpt-3.5-turbo"
AZURE = "gpt-35-turbo"
PROMPT = "héllo ✓ 你好 🙂"
BODY: dict[str, Any] = {
    "model": ASKED,
    "messages": [{"role": "user", "content": PROMPT}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
#: Few pieces keep the every-split-point tests fast; the characters take 2, 3 and 4 bytes.
PIECES = ["Hé", "llo ", "你好 ", "🙂"]


def sse(documents: list[dict[str, Any]]) -> bytes:
    """Azure's wire form: one `data:` event per document, then `data: [DONE]`."""
    lines = [b"data: " + json.dumps(d, ensure_ascii=False).encode() for d in documents] + [b"data: [DONE]"]
    return b"".join(line + b"\n\n" for line in lines)


CHAT = sse(list(answers.chat_stream(BODY, AZURE, PIECES)))
COMPLETIONS = sse(list(answers.completion_stream(BODY, AZURE, PIECES)))
RESPONSE = _response(
    {"model": "gpt-4o"}, "gpt-4o-2024-08-06", "".join(PIECES), answers.usage(BODY, len(PIECES))
)
RESPONSES = b"".join(_stream(RESPONSE, PIECES).pieces)
EXTRAS = (
    b": keep-alive\n\nid: 7\nevent: message\nretry: 3000\ndata:" + CHAT.split(b"\n\n")[1][6:] + b"\n\n"
    b"event: ping\ndata: {}\n\n" + CHAT.split(b"\n\n", 2)[2]
)
STREAMS = {
    "chat": CHAT,
    "chat-crlf": CHAT.replace(b"\n", b"\r\n"),
    "completions": COMPLETIONS,
    "responses": RESPONSES,
    "extras": EXTRAS,
    "unterminated": CHAT.removesuffix(b"data: [DONE]\n\n").removesuffix(b"\n\n"),
}


def reshape(stream: bytes, model: str | None = ASKED) -> bytes:
    reshaper = EventReshaper(model)
    return reshaper.feed(stream) + reshaper.finish()


def events(output: bytes) -> list[list[bytes]]:
    """Each event of a stream, as its lines."""
    return [event.split(b"\n") for event in output.replace(b"\r\n", b"\n").split(b"\n\n") if event]


def payloads(output: bytes) -> list[Any]:
    """Each event's data, parsed (`[DONE]` as the string)."""
    found = []
    for lines in events(output):
        data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
        found.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return found


def test_chat_stream_in_openai_shape() -> None:
    before, after = payloads(CHAT), payloads(reshape(CHAT))
    assert before[0]["choices"] == []
    assert "prompt_filter_results" in before[0]
    assert len(after) == len(before) - 1
    assert after[-1] == "[DONE]"
    chunks = after[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["model"] == ASKED for chunk in chunks)
    assert b"filter_" not in reshape(CHAT)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == before[-2]["usage"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(PIECES)


def test_completion_stream_in_openai_shape() -> None:
    after = payloads(reshape(COMPLETIONS))
    assert after[-1] == "[DONE]"
    assert after[-2]["usage"]["completion_tokens"] == len(PIECES)
    assert all(chunk["model"] == ASKED and chunk["object"] == "text_completion" for chunk in after[:-1])
    assert "".join(c["choices"][0]["text"] for c in after[:-2]) == "".join(PIECES)
    assert b"filter_" not in reshape(COMPLETIONS)


def test_without_client_model_filters_go_and_model_stays() -> None:
    after = payloads(reshape(CHAT, None))
    assert all(chunk["model"] == AZURE for chunk in after[:-1])
    assert b"filter_" not in reshape(CHAT, None)


@pytest.mark.parametrize("name", STREAMS)
def test_every_split_point_gives_the_same_output(name: str) -> None:
    stream = STREAMS[name]
    whole = reshape(stream)
    for cut in range(len(stream) + 1):
        reshaper = EventReshaper(ASKED)
        assert reshaper.feed(stream[:cut]) + reshaper.feed(stream[cut:]) + reshaper.finish() == whole, cut
    reshaper = EventReshaper(ASKED)
    assert b"".join(reshaper.feed(stream[i : i + 1]) for i in range(len(stream))) + reshaper.finish() == whole


@pytest.mark.parametrize("name", ["chat", "chat-crlf", "responses", "extras"])
def test_each_event_leaves_as_soon_as_it_is_complete(name: str) -> None:
    stream = STREAMS[name]
    reshaper = EventReshaper(ASKED)
    ends = [m.end() for m in re.finditer(rb"\n\r?\n", stream)]
    outputs = [reshaper.feed(stream[i : i + 1]) for i in range(len(stream))]
    answered = [i + 1 for i, output in enumerate(outputs) if output]
    dropped = 1 if name.startswith("chat") else 0  # the filter-only chunk yields nothing
    assert answered == ends[dropped:]
    assert reshaper.finish() == b""


def test_crlf_stream_keeps_its_line_endings() -> None:
    assert reshape(STREAMS["chat-crlf"]) == reshape(CHAT).replace(b"\n", b"\r\n")


def test_split_between_cr_and_lf() -> None:
    event = b'data: {"model":"gpt-35-turbo","choices":[]}\r\n\r\n'
    reshaper = EventReshaper(ASKED)
    assert reshaper.feed(event[:-1]) == b""
    assert reshaper.feed(event[-1:]) == b'data: {"model":"gpt-3.5-turbo","choices":[]}\r\n\r\n'


def test_multibyte_character_split_across_chunks() -> None:
    cut = CHAT.index("你".encode()) + 1
    reshaper = EventReshaper(ASKED)
    output = reshaper.feed(CHAT[:cut]) + reshaper.feed(CHAT[cut:]) + reshaper.finish()
    assert "你好".encode() in output
    assert output == reshape(CHAT)
    output.decode()


def test_other_lines_are_kept_and_data_rewritten_in_place() -> None:
    stream = (
        b": keep-alive\n\n"
        b'id: 7\nevent: message\nretry: 3000\ndata:{"model":"gpt-35-turbo","choices":[]}\n: note\n\n'
    )
    assert reshape(stream) == (
        b": keep-alive\n\n"
        b'id: 7\nevent: message\nretry: 3000\ndata: {"model":"gpt-3.5-turbo","choices":[]}\n: note\n\n'
    )


def test_multi_line_data_is_joined_before_parsing() -> None:
    stream = b'id: 1\ndata: {"model": "gpt-35-turbo",\ndata: "choices": []}\nevent: x\n\n'
    assert reshape(stream) == b'id: 1\ndata: {"model":"gpt-3.5-turbo","choices":[]}\nevent: x\n\n'


@pytest.mark.parametrize(
    "event",
    [
        b'data: not json "model" filter_results',
        b'data: ["model", "filter_results"]',
        b'data: {"model": "gpt-35-turbo",\n\ndata: "choices": []}',
        b'data: {"model": "\xff", "choices": []}',
        b'data: {"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'event: x\nid: "model"',
        b'data: {"error": {"code": "content_filter", "message": "The model filtered it"}}',
        b'data: {"model": "gpt-3.5-turbo", "choices": [{"delta": {}}]}',
        b"data: [DONE]",
    ],
)
def test_events_with_nothing_to_change_pass_byte_for_byte(event: bytes) -> None:
    assert reshape(event + b"\n\n") == event + b"\n\n"
    assert reshape(event) == event


def test_filter_only_and_usage_chunks() -> None:
    opening = {"choices": [], "created": 0, "id": "", "model": "", "prompt_filter_results": []}
    usage = {"choices": [], "model": AZURE, "usage": {"total_tokens": 3}, "prompt_filter_results": []}
    output = payloads(reshape(sse([opening, usage])))
    assert output == [{"choices": [], "model": ASKED, "usage": {"total_tokens": 3}}, "[DONE]"]


def test_asynchronous_filter_annotations() -> None:
    offsets = {"check_offset": 35, "start_offset": 35, "end_offset": 73}
    annotation = {
        "choices": [
            {
                "index": 0,
                "finish_reason": None,
                "content_filter_results": answers.SAFE,
                "content_filter_offsets": offsets,
            }
        ],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
    }
    content = {
        "model": AZURE,
        "choices": [{"index": 0, "delta": {"content": "hi"}, "content_filter_offsets": offsets}],
    }
    output = payloads(reshape(sse([annotation, content])))
    assert output == [{"model": ASKED, "choices": [{"index": 0, "delta": {"content": "hi"}}]}, "[DONE]"]


@pytest.mark.parametrize(
    ("rest", "expected"),
    [
        (b"", b""),
        (b'data: {"model":"gpt-35-turbo"', b'data: {"model":"gpt-35-turbo"'),
        (b'data: {"model":"gpt-35-turbo","choices":[]}', b'data: {"model":"gpt-3.5-turbo","choices":[]}'),
        (b'data: {"model":"gpt-35-turbo","choices":[]}\n', b'data: {"model":"gpt-3.5-turbo","choices":[]}\n'),
        (b'data: {"model":"gpt-35-turbo","choices":[]}\r', b'data: {"model":"gpt-3.5-turbo","choices":[]}\r'),
        (b'data: {"choices":[],"prompt_filter_results":[]}\r\n', b""),
        (b"data: [DONE]", b"data: [DONE]"),
    ],
)
def test_finish_hands_back_the_unterminated_last_event(rest: bytes, expected: bytes) -> None:
    reshaper = EventReshaper(ASKED)
    assert reshaper.feed(b"data: [DONE]\n\n" + rest) == b"data: [DONE]\n\n"
    assert reshaper.finish() == expected


def plain(document: dict[str, Any]) -> dict[str, Any]:
    reshaped: dict[str, Any] = json.loads(reshape_json(json.dumps(document).encode(), ASKED))
    return reshaped


def test_plain_chat_completion() -> None:
    before = answers.chat_completion(BODY, AZURE, PIECES)
    choice = {k: v for k, v in before["choices"][0].items() if k != "content_filter_results"}
    expected = {k: v for k, v in before.items() if k != "prompt_filter_results"}
    assert plain(before) == expected | {"model": ASKED, "choices": [choice]}


def test_plain_text_completion_and_embeddings() -> None:
    completion = plain(answers.text_completion(BODY, AZURE, PIECES))
    assert completion["model"] == ASKED
    assert "filter" not in json.dumps(completion)
    vectors = answers.embeddings({"input": ["a", "b"]}, "text-embedding-ada-002")
    assert plain(vectors) == vectors | {"model": ASKED}


def test_plain_body_is_compact_utf8() -> None:
    document = answers.chat_completion(BODY, AZURE, PIECES)
    reshaped = reshape_json(json.dumps(document).encode(), ASKED)
    assert reshaped == json.dumps(json.loads(reshaped), separators=(",", ":"), ensure_ascii=False).encode()
    assert "".join(PIECES).encode() in reshaped


@pytest.mark.parametrize(
    "body",
    [
        json.dumps(answers.content_filter_refusal()).encode(),
        b'{"error": {"code": "DeploymentNotFound", "message": "The model was not found"}}',
        b"<html>Bad gateway: model filter_results</html>",
        b'["model", "filter_results"]',
        b'{"model": "gpt-35-turbo", "choices": [',
        b"",
        b'{"object": "list", "data": [{"id": "gpt-35-turbo", "object": "model"}]}',
        b'{"object" : "chat.completion", "model" : "gpt-3.5-turbo", "choices" : []}',
    ],
)
def test_plain_bodies_with_nothing_to_change_come_back_unchanged(body: bytes) -> None:
    assert reshape_json(body, ASKED) is body


def test_plain_responses_api() -> None:
    before = RESPONSE | {"prompt_filter_results": [], "content_filter_results": answers.SAFE}
    assert plain(before) == RESPONSE | {"model": ASKED}


def test_streamed_responses_api() -> None:
    output = reshape(RESPONSES)
    before, after = events(RESPONSES), events(output)
    assert [lines[0] for lines in after] == [lines[0] for lines in before]
    for old, new in zip(before, after, strict=True):
        if b"response.output_text.delta" in old[0]:
            assert new == old
    documents = payloads(output)
    with_response = [d for d in documents if "response" in d]
    assert [d["type"] for d in with_response] == [
        "response.created",
        "response.in_progress",
        "response.completed",
    ]
    assert all(d["response"]["model"] == ASKED for d in with_response)
    assert documents[-1]["response"] == RESPONSE | {"model": ASKED}


def test_streamed_responses_api_filter_results_removed() -> None:
    event = {
        "type": "response.completed",
        "sequence_number": 9,
        "content_filter_results": answers.SAFE,
        "response": RESPONSE | {"content_filter_results": answers.SAFE, "prompt_filter_results": []},
    }
    stream = b"event: response.completed\n" + sse([event]).removesuffix(b"data: [DONE]\n\n")
    document = payloads(reshape(stream))[0]
    assert document == {
        "type": "response.completed",
        "sequence_number": 9,
        "response": RESPONSE | {"model": ASKED},
    }
