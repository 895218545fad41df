"""Reading a request off the wire once, with the body limit enforced while reading.

aiohttp's server decodes a gzip, deflate, br or zstd body as it parses it, so what is read here is the decoded
body: it is both what the translator reads the model from and what is forwarded, without the `Content-Encoding`
that no longer describes it. Its size is checked as it is decoded, so a compression bomb gets 413 like any large
body. The bytes held by all bodies being read at once are bounded by AZPROXY_MAX_BUFFERED (503 past it).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from azproxy.errors import PayloadTooLarge, ProxyError
from azproxy.record import RECORD
from azproxy.state import state_of
from azproxy.translate import IncomingRequest

#: The encodings aiohttp's server decodes while parsing (3.12 to 3.14); others reach azproxy, and Azure, as sent.
DECODED_BY_SERVER: Final = frozenset({"gzip", "deflate", "br", "zstd"})
#: What one read from the body asks for at most: a reservation grows by about this much at a time.
_READ_SIZE: Final = 64 * 1024


class Overloaded(ProxyError):
    """Too many bodies are being read at once: the client may retry (`Retry-After`), it did nothing wrong."""

    status = 503
    error_type = "server_error"


async def read_incoming(request: web.Request, max_body: int) -> IncomingRequest:
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise _too_large(max_body)
    budget = state_of(request).bodies
    held = declared or 0  # reserved up front, then grown as the body (decoded) outgrows it
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
    headers = request.headers
    if headers.get("Content-Encoding", "").lower() in DECODED_BY_SERVER:
        decoded = CIMultiDict(headers)
        del decoded["Content-Encoding"]
        headers = CIMultiDictProxy(decoded)
    url = request.rel_url
    record = request[RECORD]
    record.bytes_in = len(body)
    return IncomingRequest(
        method=request.method,
        raw_path=url.raw_path_qs,
        path=url.path,
        query=url.query,
        headers=headers,
        body=bytes(body),
        request_id=record.request_id,
    )


def _too_large(max_body: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than azproxy accepts ({max_body} bytes; AZPROXY_MAX_BODY raises it).",
        code="request_too_large",
    )


def _overloaded() -> Overloaded:
    return Overloaded(
        "azproxy is reading too many request bodies at once (AZPROXY_MAX_BUFFERED); retry shortly.",
        code="server_busy",
        headers={"Retry-After": "1"},
    )
