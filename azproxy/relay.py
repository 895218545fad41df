"""Piping a backend's answer back to the client: small bodies in one write, everything else as it arrives."""

from __future__ import annotations

import logging
from typing import Final

import aiohttp
from aiohttp import web

from .errors import GatewayTimeout, ProxyError
from .translate import HOP_BY_HOP, copy_headers

log = logging.getLogger(__name__)

#: Answers with a known length up to this size are read whole and sent with one write: cheaper than streaming.
BUFFERED_LIMIT: Final = 256 * 1024


async def relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Send `upstream` to the client and always release it; a client that leaves closes the upstream at once."""
    try:
        response = await _relay(request, upstream)
    except BaseException:
        upstream.close()  # not released to the pool: the backend must see the request end now
        raise
    upstream.release()
    return response


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    headers = copy_headers(upstream.headers, HOP_BY_HOP)
    is_sse = upstream.content_type == "text/event-stream"
    length = upstream.content_length
    if not is_sse and length is not None and length <= BUFFERED_LIMIT:
        body = await upstream.read()
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    if is_sse:
        await _pipe_events(upstream, response)
    else:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    await response.write_eof()
    return response


async def _pipe_events(upstream: aiohttp.ClientResponse, response: web.StreamResponse) -> None:
    """Each chunk is written as it arrives; the stream always ends on a complete event.

    A backend failure after the first byte can only be told as one last `data: {"error": ...}` event.
    """
    tail = b""
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            tail = (tail + chunk)[-3:]
    except (TimeoutError, aiohttp.ServerTimeoutError):
        failure: ProxyError | None = GatewayTimeout(
            "The backend stopped sending in the middle of the stream.", code="upstream_timeout"
        )
    except aiohttp.ClientPayloadError:
        failure = ProxyError("The backend broke off the stream.", code="upstream_stream_broken")
    else:
        failure = None
    ending = _event_terminator(tail)
    if failure is not None:
        log.warning("stream from backend ended early: %s", failure.message)
        ending += failure.to_event()
    if ending:
        await response.write(ending)


def _event_terminator(tail: bytes) -> bytes:
    """What must follow `tail` so that the last event is complete; SSE ends lines with LF, CRLF or CR."""
    if not tail or tail.endswith((b"\n\n", b"\r\r", b"\n\r\n", b"\n\r")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\r\n" if tail.endswith(b"\r") else b"\n\n"
