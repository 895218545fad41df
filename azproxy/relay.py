"""Piping a backend's answer back to the client: small bodies in one write, everything else as it arrives."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Final

import aiohttp
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict

from .connections import Answer
from .errors import BadGateway, GatewayTimeout, ProxyError
from .headers import HOP_BY_HOP, copy_headers
from .record import RECORD
from .rewrite import Rewrite, is_json
from .shape import SERVED_MODEL_HEADER, EventReshaper
from .usage import NO_USAGE, StreamMeter, TokenUsage, usage_in_json

log = logging.getLogger(__name__)

#: Answers with a known length up to this size are read whole and sent with one write: cheaper than streaming.
BUFFERED_LIMIT: Final = 256 * 1024
#: The most of an answer azproxy reads before sending it (errors and reshaped answers): past it, the rest follows
#: unchanged as it arrives.
MAX_WHOLE: Final = 16 * 1024 * 1024
#: The most azproxy decodes of a compressed answer it must read (usage, reshaping): past it, sent as it came.
MAX_DECODED: Final = 16 * 1024 * 1024
#: How much of a streamed JSON answer is kept to find its usage (which Azure puts at the end).
USAGE_TAIL: Final = 64 * 1024
#: The most one step of decoding a compressed stream yields: a small chunk cannot make azproxy hold more.
DECODE_STEP: Final = 256 * 1024

UsageReport = Callable[[TokenUsage], None]
#: Reads, and may rewrite, a whole 2xx JSON answer before it is sent (ownership records, listings).
JsonAnswer = Callable[[bytes], Awaitable[bytes]]
#: Sees the raw chunks of a 2xx event stream before they are sent, until it returns True.
EventWatch = Callable[[bytes], Awaitable[bool]]


class _Tally:
    """What one answer used, as far as it got: the usage it reported, or what an estimate needs."""

    __slots__ = ("finished", "meter", "prompt_bytes", "sent", "usage")

    def __init__(self, prompt_bytes: int) -> None:
        self.usage = NO_USAGE
        self.meter: StreamMeter | None = None
        #: Body bytes written to the client so far, for answers that were not sent in one piece.
        self.sent = 0
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
    upstream: Answer,
    *,
    extra_headers: Mapping[str, str] | None = None,
    on_usage: UsageReport | None = None,
    rewrite: Rewrite | None = None,
    hide_stream_usage: bool = False,
    prompt_bytes: int = 0,
    on_json_answer: JsonAnswer | None = None,
    on_events: EventWatch | None = None,
) -> web.StreamResponse:
    """Send `upstream` to the client and always release it; a client that leaves closes the upstream at once.

    `extra_headers` replace the backend's (a client's own rate-limit headers); `on_usage` learns, exactly once,
    the tokens the answer used (see `_Tally.final`); `rewrite` reshapes Azure's answers (see rewrite.py);
    `hide_stream_usage` takes out the usage azproxy asked for on the client's behalf. `on_json_answer` is given
    every 2xx JSON answer whole (decoded; one too large to read whole is refused with 502, never sent unseen);
    `on_events` sees a 2xx stream's chunks first.
    """
    tally = _Tally(prompt_bytes)
    hooks = (on_json_answer, on_events)
    try:
        response = await _relay(request, upstream, extra_headers, rewrite, tally, hide_stream_usage, hooks)
    except BaseException:
        upstream.close()  # not released to the pool: the backend must see the request end now
        raise
    finally:
        if on_usage is not None:
            on_usage(tally.final())
        _note(request, tally)
    upstream.release()
    return response


async def _relay(
    request: web.Request,
    upstream: Answer,
    extra_headers: Mapping[str, str] | None,
    rewrite: Rewrite | None,
    tally: _Tally,
    hide_stream_usage: bool,
    hooks: tuple[JsonAnswer | None, EventWatch | None],
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
    succeeded = 200 <= upstream.status < 300
    on_json_answer = hooks[0] if succeeded and is_json(upstream.content_type) else None
    head = b""
    if not is_sse and ((length is not None and length <= BUFFERED_LIMIT) or reshaped or on_json_answer):
        head, whole = await read_whole(upstream, MAX_WHOLE)
        if whole and on_json_answer is not None:
            head = await on_json_answer(_readable(head, headers))
        if whole:
            answer = _whole_response(upstream, headers, head, rewrite if reshaped else None, tally)
            record = request.get(RECORD)
            if record is not None and SERVED_MODEL_HEADER in answer.headers:
                record.served_model = answer.headers[SERVED_MODEL_HEADER]
            return answer
        if on_json_answer is not None:
            raise BadGateway(
                f"The backend's answer is larger than {MAX_WHOLE} bytes.", code="answer_too_large"
            )
        log.warning(
            "an answer (status %d) is larger than %d bytes; relayed unchanged as it arrives",
            upstream.status,
            MAX_WHOLE,
        )
    decoder = _StreamDecoder.for_encoding(headers.getall("Content-Encoding", []))
    readable = decoder is not None or "Content-Encoding" not in headers
    reshaper = rewrite.events() if is_sse and rewrite is not None and readable else None
    metered = upstream.status == 200 and readable
    if is_sse and decoder is not None and (reshaper is not None or (hide_stream_usage and metered)):
        decoder.sends_decoded = True  # the stream is changed on its way: it goes out decoded
        headers.popall("Content-Encoding")
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if length is not None and not is_sse:
        response.content_length = length  # the body goes out as it came, so its length still holds
    try:
        await response.prepare(request)
        if is_sse:
            hides = hide_stream_usage and metered and (decoder is None or decoder.sends_decoded)
            tally.meter = StreamMeter(hide_usage=hides) if metered else None
            watch = hooks[1] if succeeded else None
            await _pipe_events(upstream, response, tally, reshaper, watch, decoder)
            tally.finished = True
        else:
            metered = metered and is_json(upstream.content_type)
            tail = bytearray() if metered else None
            if head:
                await response.write(head)
                tally.sent += len(head)
                _keep_tail(tail, head, decoder)
            if not await _pipe_bytes(request, upstream, response, tail, tally, decoder):
                return response  # cut short: the connection is closed, so the client sees an incomplete body
            if tail is not None and (decoder is None or not decoder.failed):
                tally.usage = usage_in_json(bytes(tail))
        await response.write_eof()
    except ConnectionResetError:
        # The client left while the answer was being written: its doing, not a failure of azproxy's.
        log.debug("client left before the answer was complete")
        upstream.close()
    return response


def _whole_response(
    upstream: Answer,
    headers: CIMultiDict[str],
    body: bytes,
    rewrite: Rewrite | None,
    tally: _Tally,
) -> web.Response:
    """An answer read whole, its usage taken and, given `rewrite`, reshaped."""
    encoding = headers.get("Content-Encoding")
    readable = _decoded(body, encoding) if encoding else body
    if upstream.status == 200 and readable is not None and is_json(upstream.content_type):
        tally.usage = usage_in_json(readable)
    if rewrite is not None and readable is not None:
        headers.popall("Content-Encoding", None)  # what is sent is the decoded, rewritten body
        served = None
        if upstream.status >= 400:
            body = rewrite.error(upstream.status, readable)
        else:
            body, served = rewrite.answer(readable)
        if served is not None:
            headers[SERVED_MODEL_HEADER] = served
    return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)


async def read_whole(upstream: Answer, limit: int) -> tuple[bytes, bool]:
    """The answer and True, or its first `limit` bytes or so and False when it is longer (the rest is left to
    stream). Nothing has been sent yet, so a failure can still be a proper 502 or 504."""
    body = bytearray()
    try:
        while len(body) <= limit:
            chunk = await upstream.content.read(limit + 1 - len(body))
            if not chunk:
                return bytes(body), True
            body += chunk
        return bytes(body), False
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise GatewayTimeout(
            "The backend stopped sending in the middle of its answer.", code="upstream_timeout"
        ) from None
    except aiohttp.ClientPayloadError:
        raise BadGateway("The backend broke off its answer.", code="upstream_broken") from None


async def _pipe_bytes(
    request: web.Request,
    upstream: Answer,
    response: web.StreamResponse,
    tail: bytearray | None,
    tally: _Tally,
    decoder: _StreamDecoder | None,
) -> bool:
    """Copy a non-event body as it arrives, keeping its last `USAGE_TAIL` bytes (decoded, given `decoder`) in
    `tail` if one is given. A backend failure after the status line has gone out can only be told by closing
    the connection (a second response would corrupt the first): False then."""
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
            tally.sent += len(chunk)
            _keep_tail(tail, chunk, decoder)
    except (TimeoutError, aiohttp.ServerTimeoutError, aiohttp.ClientPayloadError) as exc:
        log.warning("answer from backend broke off (%s); closing the client connection", type(exc).__name__)
        if request.transport is not None:
            request.transport.close()
        return False
    return True


async def _pipe_events(
    upstream: Answer,
    response: web.StreamResponse,
    tally: _Tally,
    reshaper: EventReshaper | None,
    watch: EventWatch | None,
    decoder: _StreamDecoder | None = None,
) -> None:
    """Each chunk is written as it arrives; the stream always ends on a complete event.

    A compressed stream (given `decoder`) is read decoded, and sent decoded when it is changed on its way,
    else as it came. A backend failure after the first byte can only be told as one last
    `data: {"error": ...}` event (not inside a stream sent compressed: that one just ends).
    """
    tail = b""
    meter = tally.meter
    compressed = decoder is not None and not decoder.sends_decoded
    try:
        async for raw in upstream.content.iter_any():
            if watch is not None and await watch(raw):
                watch = None
            for piece in decoder.pieces(raw) if decoder is not None else (raw,):
                chunk = meter.feed(piece) if meter is not None else piece
                if reshaper is not None:
                    chunk = reshaper.feed(chunk)
                if chunk and not compressed:
                    await response.write(chunk)
                    tally.sent += len(chunk)
                    tail = (tail + chunk)[-3:]
            if compressed:
                await response.write(raw)
                tally.sent += len(raw)
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
    ending = _event_terminator((tail + rest)[-3:]) if not compressed else b""
    if failure is None and decoder is not None and decoder.failed and not compressed:
        failure = ProxyError("The backend's compressed stream could not be decoded.", code="upstream_broken")
    if failure is not None and compressed:
        log.warning("compressed stream from backend ended early: %s", failure.message)
    elif failure is not None:
        log.warning("stream from backend ended early: %s", failure.message)
        ending += failure.to_event()
    if rest or ending:
        await response.write(rest + ending)
        tally.sent += len(rest) + len(ending)


def _note(request: web.Request, tally: _Tally) -> None:
    """The request's record learns what went out (answers sent whole are counted when prepared)."""
    record = request.get(RECORD)
    if record is None:
        return
    if tally.sent:
        record.bytes_out = tally.sent
    if tally.meter is not None:
        record.chunks = tally.meter.events


def replay(upstream: Answer, body: bytes) -> None:
    """Put back a whole body read ahead (a refusal the pipeline looked at), so the relay reads it as it came."""
    loop = asyncio.get_running_loop()
    content = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    content.feed_data(body)
    content.feed_eof()
    upstream.content = content


class _StreamDecoder:
    """A gzip or deflate answer decoded as it passes, for reading its usage or changing it: each step yields at
    most DECODE_STEP bytes, so nothing decoded is ever held whole. Undecodable data ends the decoding (`failed`)."""

    __slots__ = ("_zlib", "failed", "sends_decoded")

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(wbits=47)  # gzip or zlib framing, told apart by the header
        self.failed = False
        #: The answer goes to the client decoded (without its Content-Encoding), else as it came.
        self.sends_decoded = False

    @classmethod
    def for_encoding(cls, encodings: list[str]) -> _StreamDecoder | None:
        """A decoder for one gzip or deflate coding; None for none, others, or several."""
        if len(encodings) != 1 or encodings[0].strip().lower() not in ("gzip", "deflate"):
            return None
        return cls()

    def pieces(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        while data and not self.failed:
            try:
                piece = self._zlib.decompress(data, DECODE_STEP)
            except zlib.error:
                log.warning("a compressed answer could not be decoded; its usage is not read")
                self.failed = True
                return
            data = self._zlib.unconsumed_tail
            if piece:
                yield piece


def _keep_tail(tail: bytearray | None, chunk: bytes, decoder: _StreamDecoder | None) -> None:
    """The last USAGE_TAIL bytes of the answer so far, decoded given `decoder`."""
    if tail is None:
        return
    for piece in decoder.pieces(chunk) if decoder is not None else (chunk,):
        tail += piece
        del tail[:-USAGE_TAIL]


def _readable(body: bytes, headers: CIMultiDict[str]) -> bytes:
    """An answer a hook must read, decoded (its Content-Encoding then removed); 502 if it cannot be."""
    encodings = headers.popall("Content-Encoding", None)
    if not encodings:
        return body
    decoded = _decoded(body, encodings[0]) if len(encodings) == 1 else None
    if decoded is None:
        raise BadGateway(
            "The backend's answer is in an encoding azproxy cannot read.", code="answer_unreadable"
        )
    return decoded


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


#: For callers that read a small answer before relaying it (the pipeline's parameter refusals).
decoded: Final = _decoded


def _event_terminator(tail: bytes) -> bytes:
    """What must follow `tail` so that the last event is complete; SSE ends lines with LF, CRLF or CR."""
    if not tail or tail.endswith((b"\n\n", b"\r\r", b"\n\r\n", b"\n\r")):
        return b""
    if tail.endswith(b"\n"):
        return b"\n"
    return b"\r\n" if tail.endswith(b"\r") else b"\n\n"
