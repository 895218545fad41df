"""Finding, and where Azure needs it replacing, the model a request body names; every other byte stays as sent.

JSON bodies are parsed once; multipart bodies are only scanned for their small `model` part, so an uploaded
file is never copied just to learn the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from .errors import BadRequest

_DECODER: Final = json.JSONDecoder()
_WHITESPACE: Final = " \t\n\r"


@dataclass(frozen=True, slots=True)
class FormField:
    value: str
    start: int
    end: int


def json_document(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (UTF-8, as Azure reads it), with at most one top-level `model`: with two,
    a check on one and a backend reading the other would disagree."""
    try:
        document = json.loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object.", code="invalid_json")
    if body.count(b'"model"') > 1 and len(_top_level_spans(body.decode(), "model")) > 1:
        raise BadRequest(
            "The request body names 'model' more than once.", param="model", code="invalid_model"
        )
    return document


def model_in(document: dict[str, Any], *, required: bool) -> str | None:
    model = document.get("model")
    if model is None:
        if required:
            raise BadRequest("You must provide a model parameter.", param="model", code="missing_model")
        return None
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string.", param="model", code="invalid_model")
    return model


def replace_json_model(body: bytes, deployment: str) -> bytes:
    """The body with every top-level `"model"` value replaced by `deployment`, all other bytes unchanged."""
    text = body.decode()  # json_document already checked it is UTF-8 JSON
    spans = _top_level_spans(text, "model")
    if not spans:
        return body
    replacement = json.dumps(deployment)
    pieces, position = [], 0
    for start, end in spans:
        pieces += [text[position:start], replacement]
        position = end
    pieces.append(text[position:])
    return "".join(pieces).encode()


def _top_level_spans(text: str, key: str) -> list[tuple[int, int]]:
    """Where the values of `key` sit in a JSON object's text, found with the json module's own scanner."""
    spans: list[tuple[int, int]] = []
    index = _skip(text, 0)
    if not text.startswith("{", index):
        return spans
    index = _skip(text, index + 1)
    while index < len(text) and text[index] != "}":
        name, index = _DECODER.raw_decode(text, index)
        index = _skip(text, _skip(text, index) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, index)
        if name == key:
            spans.append((index, end))
        index = _skip(text, end)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
    return spans


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def form_field(body: bytes, content_type: str, name: str) -> FormField | None:
    """The value and byte span of the multipart/form-data field `name`, or None when the body has none; a field
    given twice is refused (a check on one and a backend reading the other would disagree)."""
    boundary = _boundary(content_type)
    delimiter = b"--" + boundary
    found: FormField | None = None
    position = body.find(delimiter)
    while position >= 0:
        head_start = position + len(delimiter)
        head_end = body.find(b"\r\n\r\n", head_start)
        next_delimiter = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if body.startswith(b"--", head_start) or next_delimiter < 0:
            break  # the closing delimiter, or a truncated body
        if _part_name(body[head_start:head_end]) == name:
            if found is not None:
                raise BadRequest(f"The form field '{name}' is given more than once.", param=name)
            try:
                found = FormField(body[head_end + 4 : next_delimiter].decode(), head_end + 4, next_delimiter)
            except UnicodeDecodeError:
                raise BadRequest(f"The form field '{name}' is not UTF-8 text.", param=name) from None
        position = next_delimiter + 2
    return found


def replace_span(body: bytes, field: FormField, value: str) -> bytes:
    view = memoryview(body)
    return b"".join((view[: field.start], value.encode(), view[field.end :]))


def _boundary(content_type: str) -> bytes:
    kind, _, parameters = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise BadRequest("This operation takes a multipart/form-data body.", code="invalid_content_type")
    for parameter in parameters.split(";"):
        key, _, value = parameter.strip().partition("=")
        if key.lower() == "boundary" and value.strip('"'):
            return value.strip('"').encode()
    raise BadRequest("The multipart/form-data body has no boundary.", code="invalid_content_type")


def _part_name(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        field, _, value = line.partition(b":")
        if field.strip().lower() != b"content-disposition":
            continue
        for parameter in value.split(b";"):
            key, _, quoted = parameter.strip().partition(b"=")
            if key.lower() == b"name":
                return quoted.strip(b'"').decode(errors="replace")
    return None


def set_member(body: bytes, key: str, value: str) -> bytes:
    """The JSON object `body` with top-level `key` set to the JSON text `value` (replaced where present, else
    added first), every other byte as sent."""
    text = body.decode()  # json_document already checked it is UTF-8 JSON
    spans = _top_level_spans(text, key)
    if spans:
        start, end = spans[-1]
        return (text[:start] + value + text[end:]).encode()
    opening = _skip(text, 0) + 1
    separator = "" if text[opening:].strip() == "}" else ","
    return (text[:opening] + f"{json.dumps(key)}:{value}{separator}" + text[opening:]).encode()
