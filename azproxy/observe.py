"""Watching every request: its record is made when the head is read, each step fills it in, and when the answer
is over (or the client left) the access log writes one line and the metrics count it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .accesslog import AccessLog
from .edge.arrival import ARRIVAL
from .edge.tunnel import TAKEN_OVER
from .metrics import METRICS, Metrics
from .record import RECORD, RequestRecord, request_id_for

#: The header every answer carries, azproxy's own errors included; Azure's ids pass through untouched.
REQUEST_ID_HEADER = "x-azproxy-request-id"


def observe_requests(access_log: AccessLog, metrics: Metrics | None) -> Middleware:
    """The outermost middleware: it sees the status of every answer, azproxy's own refusals included."""

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        record = RequestRecord(
            request_id_for(request.headers), request.method, request.path, time.monotonic()
        )
        request[RECORD] = record
        try:
            response = await handler(request)
            if not response.prepared and response is not TAKEN_OVER:
                # Sent here rather than by aiohttp after the middlewares, so the record sees it go out.
                await response.prepare(request)
                await response.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            record.aborted = True
            raise
        finally:
            _finish(request, record, access_log, metrics)
        return response

    return observe


def _finish(
    request: web.Request, record: RequestRecord, access_log: AccessLog, metrics: Metrics | None
) -> None:
    if record.stream and metrics is not None:
        metrics.open_streams.dec()
    arrival = request.get(ARRIVAL)
    if arrival is not None:
        record.arrival = arrival.label
        record.target = str(arrival.target) if arrival.target is not None else None
    ended = time.monotonic()
    access_log.write(record, ended)
    if metrics is not None:
        metrics.observe(record, ended - record.started)


def mark_answer(metrics: Metrics | None) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook: the answer's first byte is about to go, with the request's id."""

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        record = request.get(RECORD)
        if record is None:
            return
        response.headers[REQUEST_ID_HEADER] = record.request_id
        record.status = response.status
        record.answer_started()
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            record.bytes_out = len(response.body)
        if response.content_type == "text/event-stream" and not record.stream:
            record.stream = True
            if metrics is not None:
                metrics.open_streams.inc()

    return mark


@contextmanager
def open_tunnel(request: web.Request) -> Iterator[None]:
    """Counts a CONNECT tunnel as open (azproxy_open_tunnels) while it lasts."""
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.open_tunnels.inc()
    try:
        yield
    finally:
        if metrics is not None:
            metrics.open_tunnels.dec()
