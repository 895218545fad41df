"""Reading a request off the wire once, with the body limit enforced while reading."""

from __future__ import annotations

from aiohttp import web

from azproxy.errors import PayloadTooLarge
from azproxy.translate import IncomingRequest


async def read_incoming(request: web.Request, max_body: int) -> IncomingRequest:
    declared = request.content_length
    if declared is not None and declared > max_body:
        raise _too_large(max_body)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(max_body) from None
    url = request.rel_url
    return IncomingRequest(
        method=request.method,
        raw_path=url.raw_path_qs,
        path=url.path,
        query=url.query,
        headers=request.headers,
        body=body,
    )


def _too_large(max_body: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than azproxy accepts ({max_body} bytes; AZPROXY_MAX_BODY raises it).",
        code="request_too_large",
    )
