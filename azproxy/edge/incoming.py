"""Reading a request off the wire once, with the body limit enforced while reading.

azproxy's server leaves request bodies as the client encoded them: a gzip or deflate body is forwarded exactly
as sent, header and bytes, and the translator reads the model from a decoded copy, whose size is bounded like
any body's (a compression bomb gets 413). The bytes held by all bodies being read at once are bounded by
AZPROXY_MAX_BUFFERED (503 past it).
"""

from __future__ import annotations

import zlib
from typing import Final

from aiohttp import web

from azproxy.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, UnsupportedMediaType
from azproxy.record import RECORD
from azproxy.state import state_of
from azproxy.translate import IncomingRequest

#: What one read from the body asks for at most: a reservation grows by about this much at a time.
_READ_SIZE: Final = 64 * 1024


async def read_incoming(request: web.Request, max_body: int) -> IncomingRequest:
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise _too_large(max_body)
    budget = state_of(request).bodies
    held = declared or 0  # reserved up front, then grown as the body outgrows it
    if not budget.reserve(held):
        raise _overloaded()
    body = bytearray()
    try:
        while chunk := await request.content.read(_READ_SIZE):
            body += chunk
            if len(body) > max_body:
                raise _too_large(max_body)
            if len(body) > held:
                if not budget.reserve(len(body) - held):
                    raise _overloaded()
                held = len(body)
    finally:
        budget.release(held)
    sent = bytes(body)
    decoded = _decoded(sent, request.headers.get("Content-Encoding", ""), max_body)
    url = request.rel_url
    record = request[RECORD]
    record.bytes_in = len(sent)
    return IncomingRequest(
        method=request.method,
        raw_path=url.raw_path_qs,
        path=url.path,
        query=url.query,
        headers=request.headers,
        body=sent if decoded is None else decoded,
        request_id=record.request_id,
        sent_body=None if decoded is None else sent,
    )


def _decoded(body: bytes, encoding: str, max_body: int) -> bytes | None:
    """The decoded copy of a gzip or deflate body (None for an uncompressed one), for reading the model: the
    body itself goes on as sent. It is bounded like any body (413 for a gzip bomb)."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return None
    if coding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"azproxy reads request bodies in gzip or deflate only, not {coding!r}: send one of those or none.",
            param="Content-Encoding",
            code="unsupported_content_encoding",
        )
    decoder = zlib.decompressobj(wbits=47)  # gzip or zlib framing, told apart by the header
    try:
        decoded = decoder.decompress(body, max_body + 1)
    except zlib.error:
        raise BadRequest(
            f"The request body is not valid {coding}.", code="invalid_content_encoding"
        ) from None
    if len(decoded) > max_body or decoder.unconsumed_tail:
        raise _too_large(max_body)
    return decoded


def _too_large(max_body: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than azproxy accepts ({max_body} bytes; AZPROXY_MAX_BODY raises it).",
        code="request_too_large",
    )


def _overloaded() -> ServiceUnavailable:
    return ServiceUnavailable(
        "azproxy is reading too many request bodies at once (AZPROXY_MAX_BUFFERED); retry shortly.",
        code="server_busy",
        headers={"Retry-After": "1"},
    )
