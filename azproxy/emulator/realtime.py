"""Realtime over WebSocket, reduced to a text echo that follows the Realtime event names.

On connect the server sends `session.created`. Then, per client event (every frame is also recorded):

- `session.update` → `session.updated` with the merged session;
- `conversation.item.create` → `conversation.item.created` (the item, given an id);
- `response.create` → `response.created`, the answer to the last user item as text deltas, the text's done event
  and `response.done`; GA (`/openai/v1/realtime`) names the text events `response.output_text.delta`/`.done`,
  the preview (`/openai/realtime`) `response.text.delta`/`.done`;
- anything else, a frame that is not a JSON event, or a binary frame → an `error` event naming the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from aiohttp import WSMsgType, web

from . import answers
from .deployments import Deployment
from .objects import Obj, new_id


class RealtimeSession:
    """One WebSocket connection: its session, the conversation items so far, and the frames it records."""

    def __init__(
        self, deployment: Deployment, ga: bool, frames: list[str | bytes], chunks: int | None
    ) -> None:
        self.frames = frames
        self.chunks = chunks
        self.text_event = "response.output_text" if ga else "response.text"
        self.session: Obj = {"id": new_id("sess_"), "object": "realtime.session", "model": deployment.model}
        self.session |= {"modalities": ["text", "audio"], "voice": "alloy", "instructions": ""}
        self.items: list[Obj] = []

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        await socket.send_json(_event("session.created", session=self.session))
        async for message in socket:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            self.frames.append(message.data)
            replies = (
                self._replies(message.data)
                if message.type == WSMsgType.TEXT
                else [_error("binary frames carry no events", "invalid_frame")]
            )
            for reply in replies:
                await socket.send_json(reply)
        return socket

    def _replies(self, frame: str) -> Iterator[Obj]:
        try:
            event = json.loads(frame)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            yield _error("The frame is not a JSON event with a type.", "invalid_json")
            return
        kind, event_id = event["type"], event.get("event_id")
        if kind == "session.update":
            self.session |= event.get("session") or {}
            yield _event("session.updated", session=self.session)
        elif kind == "conversation.item.create":
            item = (event.get("item") or {}) | {"status": "completed"}
            item.setdefault("id", new_id("item_"))
            previous = self.items[-1]["id"] if self.items else None
            self.items.append(item)
            yield _event("conversation.item.created", previous_item_id=previous, item=item)
        elif kind == "response.create":
            yield from self._response()
        else:
            yield _error(f"Invalid value: '{kind}'.", "invalid_value", event_id)

    def _response(self) -> Iterator[Obj]:
        chat = {"messages": [{"role": item.get("role"), "content": _text(item)} for item in self.items]}
        pieces = answers.answer_pieces(chat, self.chunks)
        response: Obj = {
            "id": new_id("resp_"),
            "object": "realtime.response",
            "status": "in_progress",
            "output": [],
        }
        item: Obj = {"id": new_id("item_"), "type": "message", "role": "assistant", "status": "completed"}
        at = {"response_id": response["id"], "item_id": item["id"], "output_index": 0, "content_index": 0}
        yield _event("response.created", response=response)
        for piece in pieces:
            yield _event(f"{self.text_event}.delta", **at, delta=piece)
        text = "".join(pieces)
        yield _event(f"{self.text_event}.done", **at, text=text)
        item["content"] = [{"type": "text", "text": text}]
        yield _event("response.done", response=response | {"status": "completed", "output": [item]})


def _text(item: Obj) -> str:
    content = item.get("content")
    parts = content if isinstance(content, list) else []
    return " ".join(str(part.get("text", "")) for part in parts if isinstance(part, dict))


def _event(kind: str, **fields: Any) -> Obj:
    return {"type": kind, "event_id": new_id("event_")} | fields


def _error(message: str, code: str, event_id: object = None) -> Obj:
    error = {
        "type": "invalid_request_error",
        "code": code,
        "message": message,
        "param": None,
        "event_id": event_id,
    }
    return _event("error", error=error)
