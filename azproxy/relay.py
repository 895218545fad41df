"""Piping a backend's answer back to the client: small bodies in one write, everything else as it arrives."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from .errors import BadGateway, GatewayTimeout, ProxyError
from .rewrite import Rewrite, is_json
from .shape import EventReshaper
from .translate import HOP_BY_HOP, copy_headers

log = logging.getLogger(__name__)

#: Answers with a known length up to this size are read whole and sent with one write: cheaper than streaming.
BUFFERED_LIMIT: Final = 256 * 1024

UsageSink = Callable[[int], Awaitable[None]]


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str] | None = None,
    on_usage: UsageSink | None = None,
    rewrite: Rewrite | None = None,
) -> web.StreamResponse:
    """Send `upstream` to the client and always release it; a client that leaves closes the upstream at once.

    `extra_headers` replace the backend's (a client's own rate-limit headers); `on_usage` receives the tokens the
    answer reports, for answers that report any; `rewrite` reshapes Azure's answers (see rewrite.py).
    """
    try:
        response = await _relay(request, upstream, extra_headers, on_usage, rewrite)
    except BaseException:
        upstream.close()  # not released to the pool: the backend must see the request end now
        raise
    upstream.release()
    return response


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str] | None,
    on_usage: UsageSink | None,
    rewrite: Rewrite | None,
) -> web.StreamResponse:
    headers = copy_headers(upstream.headers, HOP_BY_HOP)
    if extra_headers:
        headers.update(extra_headers)
    is_sse = upstream.content_type == "text/event-stream"
    length = upstream.content_length
    reshaped = (
        rewrite is not None
        and is_json(upstream.content_type)
        and (upstream.status >= 400 or rewrite.openai_shape)
    )
    metered = on_usage is not None and is_json(upstream.content_type)  # usage sits at the end of the JSON
    if not is_sse and ((length is not None and length <= BUFFERED_LIMIT) or reshaped or metered):
        body = await _read_whole(upstream)
        if reshaped or metered:
            body = _decoded(body, headers)
        if on_usage is not None and upstream.status == 200:
            await on_usage(usage_in_json(body))
        if reshaped and rewrite is not None:
            body = rewrite.error(upstream.status, body) if upstream.status >= 400 else rewrite.answer(body)
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    await response.prepare(request)
    if is_sse:
        reshaper = rewrite.events() if rewrite is not None and "Content-Encoding" not in headers else None
        await _pipe_events(upstream, response, on_usage, reshaper)
    elif not await _pipe_bytes(request, upstream, response):
        return response  # cut short: the connection is closed, so the client sees an incomplete body
    await response.write_eof()
    return response


async def _read_whole(upstream: aiohttp.ClientResponse) -> bytes:
    """The whole answer; nothing has been sent yet, so a failure can still be a proper 502 or 504."""
    try:
        return await upstream.read()
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise GatewayTimeout(
            "The backend stopped sending in the middle of its answer.", code="upstream_timeout"
        ) from None
    except aiohttp.ClientPayloadError:
        raise BadGateway("The backend broke off its answer.", code="upstream_broken") from None


async def _pipe_bytes(
    request: web.Request, upstream: aiohttp.ClientResponse, response: web.StreamResponse
) -> bool:
    """Copy a non-event body as it arrives. A backend failure after the status line has gone out can only be
    told by closing the connection (a second response would corrupt the first): False then."""
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (TimeoutError, aiohttp.ServerTimeoutError, aiohttp.ClientPayloadError) as exc:
        log.warning("answer from backend broke off (%s); closing the client connection", type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
        return False
    return True


async def _pipe_events(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    on_usage: UsageSink | None,
    reshaper: EventReshaper | None,
) -> None:
    """Each chunk is written as it arrives; the stream always ends on a complete event.

    A backend failure after the first byte can only be told as one last `data: {"error": ...}` event.
    """
    tail = b""
    meter = _StreamMeter() if on_usage is not None else None
    try:
        async for chunk in upstream.content.iter_any():
            if meter is not None:
                meter.feed(chunk)
            if reshaper is not None:
                chunk = reshaper.feed(chunk)
                if not chunk:
                    continue
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
    if reshaper is not None:
        rest = reshaper.finish()
        if rest:
            await response.write(rest)
            tail = (tail + rest)[-3:]
    if meter is not None and on_usage is not None:
        await on_usage(meter.finish())
    ending = _event_terminator(tail)
    if failure is not None:
        log.warning("stream from backend ended early: %s", failure.message)
        ending += failure.to_event()
    if ending:
        await response.write(ending)


def _decoded(body: bytes, headers: CIMultiDict[str]) -> bytes:
    """A gzip or deflate body decoded (its header dropped), so it can be read and rewritten; others as they are."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("gzip", "deflate"):
        return body
    try:
        decoded = zlib.decompress(body, wbits=47)  # gzip or zlib framing, told apart by the header
    except zlib.error:
        return body
    del headers["Content-Encoding"]
    return decoded


def usage_in_json(body: bytes) -> int:
    """`usage.total_tokens` of an answer (also under `response`, as the Responses API nests it), else 0."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return 0
    return _total_tokens(document)


def _total_tokens(document: object) -> int:
    if not isinstance(document, dict):
        return 0
    usage = document.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
        return int(usage["total_tokens"])
    return _total_tokens(document.get("response"))


class _StreamMeter:
    """Finds the usage an SSE stream reports (its final usage chunk); complete events mentioning it are parsed."""

    _MAX_PARTIAL = 1024 * 1024

    def __init__(self) -> None:
        self._partial = b""
        self.tokens = 0

    def feed(self, chunk: bytes) -> None:
        data = self._partial + chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._partial = data[-self._MAX_PARTIAL :]
            return
        self._partial = data[end + 2 :]
        self._parse(data[:end])

    def finish(self) -> int:
        self._parse(self._partial)
        return self.tokens

    def _parse(self, events: bytes) -> None:
        if b'"usage"' not in events:
            return
        for line in events.splitlines():
            if line.startswith(b"data:") and b'"usage"' in line:
                self.tokens = usage_in_json(line[5:]) or self.tokens


def _event_terminator(tail: bytes) -> bytes:
    """What must follow `tail` so that the last event is complete; SSE ends lines with LF, CRLF or CR."""
    if not tail or tail.endswith((b"\n\n", b"\r\r", b"\n\r\n", b"\n\r")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\r\n" if tail.endswith(b"\r") else b"\n\n"
