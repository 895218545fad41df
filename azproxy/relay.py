"""Piping a backend's answer back to the client: small bodies in one write, everything else as it arrives."""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from typing import Final

import aiohttp
from aiohttp import web

from .errors import BadGateway, GatewayTimeout, ProxyError
from .headers import HOP_BY_HOP, copy_headers
from .rewrite import Rewrite, is_json
from .shape import EventReshaper
from .usage import NO_USAGE, StreamMeter, TokenUsage, usage_in_json

log = logging.getLogger(__name__)

#: Answers with a known length up to this size are read whole and sent with one write: cheaper than streaming.
BUFFERED_LIMIT: Final = 256 * 1024
#: The most azproxy decodes of a compressed answer it must read (usage, reshaping): past it, sent as it came.
MAX_DECODED: Final = 16 * 1024 * 1024
#: How much of a streamed JSON answer is kept to find its usage (which Azure puts at the end).
USAGE_TAIL: Final = 64 * 1024

UsageReport = Callable[[TokenUsage], None]


class _Tally:
    """What one answer used, as far as it got: the usage it reported, or what an estimate needs."""

    __slots__ = ("finished", "meter", "prompt_bytes", "usage")

    def __init__(self, prompt_bytes: int) -> None:
        self.usage = NO_USAGE
        self.meter: StreamMeter | None = None
        self.prompt_bytes = prompt_bytes
        #: The whole answer went out; False while it is under way and when the client left.
        self.finished = False

    def final(self) -> TokenUsage:
        """What the answer reported; a stream the client left before Azure reported usage is estimated."""
        if self.meter is None:
            return self.usage
        if self.meter.usage.reported or self.finished:
            return self.meter.usage
        return TokenUsage.estimate(self.prompt_bytes, self.meter.events)


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    *,
    extra_headers: Mapping[str, str] | None = None,
    on_usage: UsageReport | None = None,
    rewrite: Rewrite | None = None,
    hide_stream_usage: bool = False,
    prompt_bytes: int = 0,
) -> web.StreamResponse:
    """Send `upstream` to the client and always release it; a client that leaves closes the upstream at once.

    `extra_headers` replace the backend's (a client's own rate-limit headers); `on_usage` learns, exactly once,
    the tokens the answer used (see `_Tally.final`); `rewrite` reshapes Azure's answers (see rewrite.py);
    `hide_stream_usage` takes out the usage azproxy asked for on the client's behalf.
    """
    tally = _Tally(prompt_bytes)
    try:
        response = await _relay(request, upstream, extra_headers, rewrite, tally, hide_stream_usage)
    except BaseException:
        upstream.close()  # not released to the pool: the backend must see the request end now
        raise
    finally:
        if on_usage is not None:
            on_usage(tally.final())
    upstream.release()
    return response


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str] | None,
    rewrite: Rewrite | None,
    tally: _Tally,
    hide_stream_usage: bool,
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
    if not is_sse and ((length is not None and length <= BUFFERED_LIMIT) or reshaped):
        body = await _read_whole(upstream)
        encoding = headers.get("Content-Encoding")
        readable = _decoded(body, encoding) if encoding else body
        if upstream.status == 200 and readable is not None and is_json(upstream.content_type):
            tally.usage = usage_in_json(readable)
        if reshaped and rewrite is not None and readable is not None:
            headers.popall("Content-Encoding", None)  # what is sent is the decoded, rewritten body
            body = (
                rewrite.error(upstream.status, readable)
                if upstream.status >= 400
                else rewrite.answer(readable)
            )
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None and not is_sse:
        response.content_length = length  # the body goes out as it came, so its length still holds
    await response.prepare(request)
    if is_sse:
        reshaper = rewrite.events() if rewrite is not None and "Content-Encoding" not in headers else None
        metered = upstream.status == 200 and "Content-Encoding" not in headers
        tally.meter = StreamMeter(hide_usage=hide_stream_usage and metered) if metered else None
        await _pipe_events(upstream, response, tally.meter, reshaper)
        tally.finished = True
    else:
        tail = bytearray() if upstream.status == 200 and is_json(upstream.content_type) else None
        if not await _pipe_bytes(request, upstream, response, tail):
            return response  # cut short: the connection is closed, so the client sees an incomplete body
        if tail is not None and "Content-Encoding" not in headers:
            tally.usage = usage_in_json(bytes(tail))
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
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    tail: bytearray | None,
) -> bool:
    """Copy a non-event body as it arrives, keeping its last `USAGE_TAIL` bytes in `tail` if one is given.
    A backend failure after the status line has gone out can only be told by closing the connection (a second
    response would corrupt the first): False then."""
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            if tail is not None:
                tail += chunk
                del tail[:-USAGE_TAIL]
    except (TimeoutError, aiohttp.ServerTimeoutError, aiohttp.ClientPayloadError) as exc:
        log.warning("answer from backend broke off (%s); closing the client connection", type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
        return False
    return True


async def _pipe_events(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    meter: StreamMeter | None,
    reshaper: EventReshaper | None,
) -> None:
    """Each chunk is written as it arrives; the stream always ends on a complete event.

    A backend failure after the first byte can only be told as one last `data: {"error": ...}` event.
    """
    tail = b""
    try:
        async for chunk in upstream.content.iter_any():
            if meter is not None:
                chunk = meter.feed(chunk)
            if reshaper is not None:
                chunk = reshaper.feed(chunk)
                if not chunk:
                    continue
            if chunk:
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
    rest = meter.finish() if meter is not None else b""
    if reshaper is not None:
        rest = reshaper.feed(rest) + reshaper.finish() if rest else reshaper.finish()
    if rest:
        await response.write(rest)
        tail = (tail + rest)[-3:]
    ending = _event_terminator(tail)
    if failure is not None:
        log.warning("stream from backend ended early: %s", failure.message)
        ending += failure.to_event()
    if ending:
        await response.write(ending)


def _decoded(body: bytes, encoding: str) -> bytes | None:
    """A gzip or deflate body decoded, so it can be read and rewritten; None for other encodings and for
    bodies that decode to more than MAX_DECODED (they are sent as they came)."""
    if encoding.strip().lower() not in ("gzip", "deflate"):
        return None
    decoder = zlib.decompressobj(wbits=47)  # gzip or zlib framing, told apart by the header
    try:
        decoded = decoder.decompress(body, MAX_DECODED)
    except zlib.error:
        return None
    if decoder.unconsumed_tail or not decoder.eof:
        log.warning("a compressed answer decodes to more than %d bytes; relayed as it came", MAX_DECODED)
        return None
    return decoded


def _event_terminator(tail: bytes) -> bytes:
    """What must follow `tail` so that the last event is complete; SSE ends lines with LF, CRLF or CR."""
    if not tail or tail.endswith((b"\n\n", b"\r\r", b"\n\r\n", b"\n\r")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\r\n" if tail.endswith(b"\r") else b"\n\n"
