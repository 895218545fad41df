"""Finding, and where Azure needs it replacing, the model a request body names; every other byte stays as sent.

JSON bodies are parsed once; multipart bodies are only scanned for their small `model` part, so an uploaded
file is never copied just to learn the model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from .errors import BadRequest

_DECODER: Final = json.JSONDecoder()
_WHITESPACE: Final = " \t\n\r"
#: A printable ASCII character written as an escape: the only way a key can spell `model` without its bytes.
_ESCAPED_ASCII: Final = re.compile(rb"\\u00[2-7][0-9A-Fa-f]")


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
    # A name may be spelled with escapes (`"mod\\u0065l"`): the decoded names are compared, as Azure reads them.
    maybe_twice = body.count(b'"model"') > 1 or _ESCAPED_ASCII.search(body) is not None
    if maybe_twice and len(_top_level_spans(body.decode(), "model")) > 1:
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
    return [(member.value, member.end) for member in _members(text) if member.name == key]


@dataclass(frozen=True, slots=True)
class _Member:
    """One top-level member of a JSON object's text: its decoded name and where its name and value sit."""

    name: str
    start: int
    name_end: int
    value: int
    end: int


def _members(text: str) -> list[_Member]:
    members: list[_Member] = []
    index = _skip(text, 0)
    if not text.startswith("{", index):
        return members
    index = _skip(text, index + 1)
    while index < len(text) and text[index] != "}":
        name, name_end = _DECODER.raw_decode(text, index)
        value = _skip(text, _skip(text, name_end) + 1)  # past the colon
        _, end = _DECODER.raw_decode(text, value)
        members.append(_Member(name, index, name_end, value, end))
        index = _skip(text, end)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
    return members


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def form_field(body: bytes, content_type: str, name: str, *, text: bool = True) -> FormField | None:
    """The value and byte span of the multipart/form-data field `name`, or None when the body has none; a field
    given twice is refused (a check on one and a backend reading the other would disagree). With `text=False`
    (a file part) only the span is found and the value is left empty."""
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
                value = body[head_end + 4 : next_delimiter].decode() if text else ""
                found = FormField(value, head_end + 4, next_delimiter)
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
    """The field name of a part as a multipart reader takes it: `name`, or RFC 2231's `name*` (which readers
    prefer); a part whose names disagree, or with two Content-Disposition lines, is refused as ambiguous."""
    dispositions = [
        value
        for field, _, value in (line.partition(b":") for line in head.split(b"\r\n"))
        if field.strip().lower() == b"content-disposition"
    ]
    if not dispositions:
        return None
    if len(dispositions) > 1:
        raise BadRequest("A form part has more than one Content-Disposition.", code="invalid_form")
    _, parameters = parse_content_disposition(dispositions[0].decode("latin-1").strip())
    names = {content_disposition_filename(parameters, "name") or None, parameters.get("name")} - {None}
    if len(names) > 1:
        raise BadRequest("A form part names two different fields (name and name*).", code="invalid_form")
    return names.pop() if names else None


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


def has_member(body: bytes, key: str) -> bool:
    """Whether the JSON object `body` has a top-level `key`."""
    return any(member.name == key for member in _members(body.decode()))


def remove_member(body: bytes, key: str) -> bytes:
    """The JSON object `body` without its top-level `key` (and one comma beside it), every other byte as sent."""
    text = body.decode()  # json_document already checked it is UTF-8 JSON
    members = _members(text)
    for position in reversed(range(len(members))):
        member = members[position]
        if member.name != key:
            continue
        if position + 1 < len(members):  # up to the next member: its comma goes too
            start, end = member.start, members[position + 1].start
        elif position > 0:  # the last member: the comma before it goes
            start, end = members[position - 1].end, member.end
        else:
            start, end = member.start, member.end
        text = text[:start] + text[end:]
    return text.encode()


def rename_member(body: bytes, key: str, new_key: str) -> bytes:
    """The JSON object `body` with its top-level `key` named `new_key`, every other byte as sent."""
    text = body.decode()  # json_document already checked it is UTF-8 JSON
    for member in reversed(_members(text)):
        if member.name == key:
            text = text[: member.start] + json.dumps(new_key) + text[member.name_end :]
    return text.encode()


def replace_nested_model(body: bytes, key: str, deployment: str) -> bytes:
    """The JSON object `body` with the `model` of its top-level object `key` (realtime's `session`, a
    Responses event's `response`) replaced by `deployment`, every other byte as sent."""
    text = body.decode()  # json_document already checked it is UTF-8 JSON
    for member in reversed(_members(text)):
        if member.name == key:
            inner = text[member.value : member.end]
            replaced = replace_json_model(inner.encode(), deployment).decode()
            text = text[: member.value] + replaced + text[member.end :]
    return text.encode()
