"""The Responses API kept in memory: create (plain or streamed), retrieve, delete, input items.

`model` in the body is a deployment name, checked like Azure checks it. A streamed create sends the Responses
events (`event: response.created` ... `response.output_text.delta` ... `event: response.completed`), each with
its `sequence_number`, and no `[DONE]`.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any, Final

from . import answers
from .calls import Answer, AzureError, Call, Endpoint, Stream, json_answer, sse
from .deployments import Catalog
from .objects import Obj, deleted, find, new_id, page

_SSE: Final = "text/event-stream; charset=utf-8"
#: The events before the first text delta: created, in_progress, output_item.added, content_part.added.
HEAD_EVENTS: Final = 4


class FilteredPrompt(Exception):
    """The prompt trips the content filter: Azure's 400 over HTTP, an error event over WebSocket."""


class Responses:
    """Stored responses by id, with the input items each was created from."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.responses: dict[str, Obj] = {}
        self.inputs: dict[str, list[Obj]] = {}

    def endpoints(self) -> list[Endpoint]:
        return [
            Endpoint("POST", "responses", "responses", self.create),
            Endpoint("GET", "responses/{response_id}", "responses", self.get),
            Endpoint("DELETE", "responses/{response_id}", "responses", self.delete),
            Endpoint("GET", "responses/{response_id}/input_items", "responses", self.input_items),
        ]

    def create(self, call: Call) -> Answer:
        body = call.json()
        try:
            response, pieces = self.generate(body, call.chunks)
        except FilteredPrompt:
            return json_answer(answers.content_filter_refusal(), status=400)
        if body.get("stream") is True:
            return _stream(response, pieces)
        return json_answer(response)

    def generate(
        self, body: dict[str, Any], chunks: int | None, cached: Container[str] = ()
    ) -> tuple[Obj, list[str]]:
        """The response to a create body and its text pieces, stored unless `store` is false.

        `cached` are ids a WebSocket connection remembers, valid as `previous_response_id` even unstored.
        """
        deployment = self.catalog.resolve(body.get("model"), "responses")
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.responses and previous not in cached:
            raise AzureError(
                404,
                "previous_response_not_found",
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
            )
        items = _input_items(body.get("input"))
        chat = {"messages": [{"role": item["role"], "content": _text(item)} for item in items]}
        if answers.FILTER_TRIGGER in answers.prompt_text(chat):
            raise FilteredPrompt
        pieces = answers.answer_pieces(chat, chunks)
        model = self.catalog.serving_model(deployment)
        response = _response(body, model, "".join(pieces), answers.usage(chat, len(pieces)))
        if body.get("store", True) is not False:
            self.responses[response["id"]] = response
            self.inputs[response["id"]] = items
        return response, pieces

    def get(self, call: Call) -> Answer:
        return json_answer(self._response(call))

    def delete(self, call: Call) -> Answer:
        response = self._response(call)
        del self.responses[response["id"]], self.inputs[response["id"]]
        return json_answer(deleted(response["id"], "response"))

    def input_items(self, call: Call) -> Answer:
        return json_answer(page(self.inputs[self._response(call)["id"]], call.query))

    def _response(self, call: Call) -> Obj:
        return find(self.responses, "Response", call.arg("response_id"))


def _input_items(raw: Any) -> list[Obj]:
    """`input` as stored input items: a string is one user message, messages keep their role and content."""
    entries = raw if isinstance(raw, list) else [{"role": "user", "content": str(raw or "")}]
    items = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        content = entry.get("content")
        parts = content if isinstance(content, list) else [{"type": "input_text", "text": str(content or "")}]
        item: Obj = {
            "id": new_id("msg_"),
            "type": "message",
            "role": entry.get("role", "user"),
            "status": "completed",
        }
        items.append(item | {"content": parts})
    return items


def _text(item: Obj) -> str:
    return " ".join(str(part.get("text", "")) for part in item["content"] if isinstance(part, dict))


def _response(body: dict[str, Any], model: str, text: str, usage: dict[str, int]) -> Obj:
    message: Obj = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": "completed"}
    message["content"] = [{"type": "output_text", "text": text, "annotations": []}]
    response: Obj = {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": time.time(),
        "status": "completed",
    }
    response |= {"model": model, "output": [message], "error": None, "incomplete_details": None}
    response |= {"instructions": body.get("instructions"), "metadata": body.get("metadata") or {}}
    response |= {"previous_response_id": body.get("previous_response_id"), "parallel_tool_calls": True}
    response |= {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0), "tools": []}
    response |= {"tool_choice": "auto", "max_output_tokens": body.get("max_output_tokens")}
    response["store"] = body.get("store", True) is not False
    response |= {"text": {"format": {"type": "text"}}, "truncation": "disabled", "user": None}
    response["usage"] = {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }
    return response


def events(response: Obj, pieces: list[str]) -> list[Obj]:
    """The events of a streamed create, each with its `type` and `sequence_number`; content from `HEAD_EVENTS` on."""
    message = response["output"][0]
    part = message["content"][0]
    started = response | {"status": "in_progress", "output": [], "usage": None}
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    head: list[tuple[str, Obj]] = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": message | {"status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", at | {"part": part | {"text": ""}}),
    ]
    deltas = [("response.output_text.delta", at | {"delta": piece, "logprobs": []}) for piece in pieces]
    tail = [
        ("response.output_text.done", at | {"text": part["text"], "logprobs": []}),
        ("response.content_part.done", at | {"part": part}),
        ("response.output_item.done", {"output_index": 0, "item": message}),
        ("response.completed", {"response": response}),
    ]
    return [
        {"type": name, "sequence_number": number} | data
        for number, (name, data) in enumerate((*head, *deltas, *tail))
    ]


def _stream(response: Obj, pieces: list[str]) -> Stream:
    """The streamed create over HTTP: the events as named server-sent events, no `[DONE]`."""
    return Stream(
        [sse(event, event["type"]) for event in events(response, pieces)],
        _SSE,
        range(HEAD_EVENTS, HEAD_EVENTS + len(pieces)),
    )
