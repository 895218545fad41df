"""multipart/form-data bodies (uploads, audio, image edits), split with aiohttp's reader and kept byte for byte."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import NamedTuple

from aiohttp import BodyPartReader, MultipartReader, StreamReader
from aiohttp.base_protocol import BaseProtocol
from aiohttp.hdrs import CONTENT_TYPE
from multidict import MultiDict, MultiDictProxy


class UploadedFile(NamedTuple):
    """A file part as sent: compare it to a `(filename, content_type, content)` tuple."""

    filename: str
    content_type: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Form:
    """The parts of a form: text fields and files, by part name, in the order they came (`image[]` may repeat)."""

    fields: MultiDictProxy[str]
    files: MultiDictProxy[UploadedFile]


async def parse_form(content_type: str, body: bytes) -> Form | None:
    """The form in `body` (sent as `content_type`, a multipart/form-data type), or None when it is malformed."""
    loop = asyncio.get_running_loop()
    # A limit above the body size: the whole body is fed at once and must never pause a (transportless) protocol.
    stream = StreamReader(BaseProtocol(loop), limit=len(body) + 1, loop=loop)
    stream.feed_data(body)
    stream.feed_eof()
    fields: MultiDict[str] = MultiDict()
    files: MultiDict[UploadedFile] = MultiDict()
    try:
        async for part in MultipartReader({CONTENT_TYPE: content_type}, stream):
            if not isinstance(part, BodyPartReader) or part.name is None:
                return None
            content = bytes(await part.read())
            if part.filename is None:
                fields.add(part.name, content.decode())
            else:
                kind = part.headers.get(CONTENT_TYPE, "application/octet-stream")
                files.add(part.name, UploadedFile(part.filename, kind, content))
    except (ValueError, RuntimeError):  # no boundary or a broken one, broken part headers or encoding
        return None
    return Form(MultiDictProxy(fields), MultiDictProxy(files))
