"""The Responses API over WebSocket (`GET /openai/v1/responses` upgraded), as Azure's "Use the Responses API in
WebSocket mode" page and OpenAI's "WebSocket mode" guide describe it.

The client sends `response.create` events: the fields of a `POST /responses` body at the top level (a nested
`response` object is merged in too), `stream` and `background` ignored. The server answers each with the events a
streamed POST sends (`response.created` ... `response.output_text.delta` ... `response.completed`), as JSON text
frames. One response runs at a time per socket: a `response.create` while one runs gets an `error` event and is
dropped. The connection remembers its last response, so `previous_response_id` works with `store: false`.

Errors are `{"type": "error", "status": N, "error": {"type", "code", "message", "param"}}` (OpenAI's WebSocket
mode guide). At `max_age` seconds (Azure: 60 minutes) the server sends an error event with code
`websocket_connection_limit_reached` and closes with code 1000; neither doc names a close code, so 1000 is the
emulator's choice, as is the `response_in_progress` code for a second create while one runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Final

from aiohttp import WSMsgType, web

from . import answers
from .calls import AzureError
from .objects import Obj
from .responses import HEAD_EVENTS, FilteredPrompt, Responses, events

_LIMIT_MESSAGE: Final = (
    "Responses websocket connection limit reached (60 minutes). "
    "Create a new websocket connection to continue."
)


class ResponseSocket:
    """One WebSocket connection: the response running on it, its last response id, and the frames it records."""

    def __init__(
        self,
        responses: Responses,
        frames: list[str | bytes],
        chunks: int | None,
        pace: tuple[float, asyncio.Event | None],
        max_age: float,
    ) -> None:
        self.responses = responses
        self.frames = frames
        self.chunks = chunks
        self.delay, self.gate = pace
        self.max_age = max_age
        self.running: asyncio.Task[None] | None = None
        self.last_id: str | None = None

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        expiry = asyncio.create_task(self._expire(socket))
        try:
            async for message in socket:
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.frames.append(message.data)
                    await self._receive(socket, message.data)
        finally:
            expiry.cancel()
            if self.running is not None:
                self.running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.running
        return socket

    async def _receive(self, socket: web.WebSocketResponse, frame: str | bytes) -> None:
        try:
            event = json.loads(frame)
        except ValueError:
            event = None
        if not isinstance(event, dict) or event.get("type") != "response.create":
            kind = event.get("type") if isinstance(event, dict) else None
            await socket.send_json(
                _error(400, "invalid_request_error", "invalid_event", f"Invalid event: {kind!r}.")
            )
            return
        if self.running is not None and not self.running.done():
            message = (
                "A response is already in progress on this connection; send the next one after it completes."
            )
            await socket.send_json(_error(400, "invalid_request_error", "response_in_progress", message))
            return
        self.running = asyncio.create_task(self._run(socket, _create_body(event)))

    async def _run(self, socket: web.WebSocketResponse, body: dict[str, Any]) -> None:
        cached = (self.last_id,) if self.last_id else ()
        try:
            response, pieces = self.responses.generate(body, self.chunks, cached)
        except AzureError as error:
            kind = "invalid_request_error" if error.status < 500 else "server_error"
            await socket.send_json(
                _error(error.status, kind, error.code, error.message, error.extra.get("param"))
            )
            return
        except FilteredPrompt:
            refusal = answers.content_filter_refusal()["error"]
            await socket.send_json(
                _error(400, "invalid_request_error", "content_filter", refusal["message"], "prompt")
            )
            return
        self.last_id = response["id"]
        for index, event in enumerate(events(response, pieces)):
            await socket.send_json(event)
            content = index - HEAD_EVENTS
            if content == 0 and self.gate is not None:
                await self.gate.wait()
            elif 0 <= content < len(pieces) and self.delay:
                await asyncio.sleep(self.delay)

    async def _expire(self, socket: web.WebSocketResponse) -> None:
        await asyncio.sleep(self.max_age)
        error = _error(400, "invalid_request_error", "websocket_connection_limit_reached", _LIMIT_MESSAGE)
        with contextlib.suppress(ConnectionError):
            await socket.send_json(error)
        await socket.close(code=1000, message=b"websocket_connection_limit_reached")


def _create_body(event: dict[str, Any]) -> dict[str, Any]:
    """A `response.create` event as a create body: its top-level fields, a nested `response` merged over them."""
    body = {
        key: value for key, value in event.items() if key not in ("type", "response", "stream", "background")
    }
    nested = event.get("response")
    return body | nested if isinstance(nested, dict) else body


def _error(status: int, kind: str, code: str, message: str, param: object = None) -> Obj:
    return {
        "type": "error",
        "status": status,
        "error": {"type": kind, "code": code, "message": message, "param": param},
    }
