"""Every way a request names a model is found the way Azure reads it: escaped JSON keys, RFC 2231 form names,
a run's assistant, the lines of a batch file."""

from __future__ import annotations

import json

import pytest

from azproxy import bodies
from azproxy.errors import BadRequest, Forbidden
from azproxy.model_refs import models_named_indirectly

BOUNDARY = "b0undary"
FORM = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes]) -> bytes:
    chunks = [
        f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
        for disposition, value in parts
    ]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def test_a_model_key_spelled_with_escapes_counts() -> None:
    with pytest.raises(BadRequest, match="more than once"):
        bodies.json_document(rb'{"model": "gpt-4o", "mod\u0065l": "o1-pro"}')
    assert bodies.json_document(rb'{"mod\u0065l": "gpt-4o"}')["model"] == "gpt-4o"
    assert bodies.json_document('{"model": "gpt-4o", "x": "\u00e9\\u00e9"}'.encode())["model"] == "gpt-4o"


@pytest.mark.parametrize(
    "second",
    ["form-data; name*=UTF-8''model", "form-data; name*=UTF-8''mod%65l", 'form-data; NAME="model"'],
)
def test_rfc2231_and_case_spellings_of_a_form_name_count(second: str) -> None:
    body = form(('form-data; name="model"', b"whisper"), (second, b"o1-pro"))
    with pytest.raises(BadRequest, match="more than once"):
        bodies.form_field(body, FORM, "model")


def test_a_form_part_with_two_names_is_ambiguous() -> None:
    body = form(("form-data; name=\"file\"; name*=UTF-8''model", b"o1-pro"))
    with pytest.raises(BadRequest, match="two different fields"):
        bodies.form_field(body, FORM, "model")


async def no_lookup(path: str) -> bytes | None:
    raise AssertionError(f"nothing should be looked up, asked for {path}")


async def test_batch_upload_lines_name_models() -> None:
    lines = b"\n".join(
        json.dumps(
            {"custom_id": str(i), "method": "POST", "url": "/chat/completions", "body": {"model": m}}
        ).encode()
        for i, m in enumerate(["gpt-4o", "o1-pro"])
    )
    upload = form(
        ('form-data; name="purpose"', b"batch"), ('form-data; name="file"; filename="b.jsonl"', lines)
    )
    assert await models_named_indirectly("POST", "/v1/files", FORM, upload, no_lookup) == ["gpt-4o", "o1-pro"]
    other = form(
        ('form-data; name="purpose"', b"assistants"), ('form-data; name="file"; filename="a.txt"', b"x")
    )
    assert await models_named_indirectly("POST", "/v1/files", FORM, other, no_lookup) == []
    broken = form(
        ('form-data; name="purpose"', b"batch"), ('form-data; name="file"; filename="b.jsonl"', b"{}")
    )
    with pytest.raises(BadRequest):
        await models_named_indirectly("POST", "/v1/files", FORM, broken, no_lookup)


async def test_runs_resolve_their_assistant_and_batches_their_file() -> None:
    asked: list[str] = []

    async def lookup(path: str) -> bytes | None:
        asked.append(path)
        if path == "/v1/assistants/asst_1":
            return b'{"id": "asst_1", "model": "o1-pro"}'
        if path == "/v1/files/file-1/content":
            return b'{"body": {"model": "gpt-4o"}}\n{"body": {"model": "o3"}}\n'
        return None

    run = json.dumps({"assistant_id": "asst_1"}).encode()
    assert await models_named_indirectly(
        "POST", "/v1/threads/thread_1/runs", "application/json", run, lookup
    ) == ["o1-pro"]
    assert await models_named_indirectly("POST", "/v1/threads/runs", "application/json", run, lookup) == [
        "o1-pro"
    ]
    named = json.dumps({"assistant_id": "asst_1", "model": "gpt-4o"}).encode()
    assert await models_named_indirectly("POST", "/v1/threads/runs", "application/json", named, lookup) == []
    batch = json.dumps({"input_file_id": "file-1", "endpoint": "/chat/completions"}).encode()
    assert await models_named_indirectly("POST", "/v1/batches", "application/json", batch, lookup) == [
        "gpt-4o",
        "o3",
    ]
    with pytest.raises(Forbidden):  # an assistant that cannot be resolved is refused, never let through
        await models_named_indirectly(
            "POST", "/v1/threads/runs", "application/json", b'{"assistant_id": "asst_unknown"}', lookup
        )
    assert asked == ["/v1/assistants/asst_1"] * 2 + [
        "/v1/files/file-1/content",
        "/v1/assistants/asst_unknown",
    ]
