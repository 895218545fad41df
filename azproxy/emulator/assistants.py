"""Assistants v2 kept in memory: assistants, threads, messages, and runs with their steps.

A run answers the thread's last user message the way chat does. Created plainly it is `queued` and completes
when first read; created with `stream: true` it plays out as Assistants server-sent events
(`event: thread.run.created` ... `event: done` / `data: [DONE]`). `model` in an assistant or a run is a
deployment name, checked like Azure checks it.
"""

from __future__ import annotations

from typing import Any, Final

from . import answers
from .calls import Answer, Call, Endpoint, Stream, bad_request, json_answer, sse
from .deployments import Catalog
from .objects import Obj, deleted, find, new_id, now, page

_RUN_STEPS: Final = {"queued": "completed", "cancelling": "cancelled"}
_SSE: Final = "text/event-stream; charset=utf-8"


class Assistants:
    """Assistants and threads by id, a thread's messages and runs by thread."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.assistants: dict[str, Obj] = {}
        self.threads: dict[str, Obj] = {}
        self.messages: dict[str, dict[str, Obj]] = {}
        self.runs: dict[str, dict[str, Obj]] = {}
        self.steps: dict[str, list[Obj]] = {}

    def endpoints(self) -> list[Endpoint]:
        run = "threads/{thread_id}/runs/{run_id}"
        return [
            Endpoint("POST", "assistants", "assistants", self.create_assistant),
            Endpoint("GET", "assistants", "assistants", self.list_assistants),
            Endpoint("GET", "assistants/{assistant_id}", "assistants", self.get_assistant),
            Endpoint("POST", "assistants/{assistant_id}", "assistants", self.modify_assistant),
            Endpoint("DELETE", "assistants/{assistant_id}", "assistants", self.delete_assistant),
            Endpoint("POST", "threads/runs", "threads", self.create_thread_and_run),
            Endpoint("POST", "threads", "threads", self.create_thread),
            Endpoint("GET", "threads/{thread_id}", "threads", lambda call: json_answer(self._thread(call))),
            Endpoint("POST", "threads/{thread_id}", "threads", self.modify_thread),
            Endpoint("DELETE", "threads/{thread_id}", "threads", self.delete_thread),
            Endpoint("POST", "threads/{thread_id}/messages", "threads", self.create_message),
            Endpoint("GET", "threads/{thread_id}/messages", "threads", self.list_messages),
            Endpoint("GET", "threads/{thread_id}/messages/{message_id}", "threads", self.get_message),
            Endpoint("POST", "threads/{thread_id}/runs", "threads", self.create_run),
            Endpoint("GET", "threads/{thread_id}/runs", "threads", self.list_runs),
            Endpoint("GET", run, "threads", self.get_run),
            Endpoint("POST", f"{run}/cancel", "threads", self.cancel_run),
            Endpoint("GET", f"{run}/steps", "threads", self.list_steps),
        ]

    # assistants

    def create_assistant(self, call: Call) -> Answer:
        body = call.json()
        self.catalog.resolve(body.get("model"), "assistants")
        assistant: Obj = {
            "id": new_id("asst_"),
            "object": "assistant",
            "created_at": now(),
            "model": body["model"],
        }
        for name in ("name", "description", "instructions"):
            assistant[name] = body.get(name)
        assistant |= {"tools": body.get("tools") or [], "tool_resources": body.get("tool_resources") or {}}
        assistant |= {"metadata": body.get("metadata") or {}, "temperature": body.get("temperature", 1.0)}
        assistant |= {"top_p": body.get("top_p", 1.0), "response_format": body.get("response_format", "auto")}
        self.assistants[assistant["id"]] = assistant
        return json_answer(assistant)

    def list_assistants(self, call: Call) -> Answer:
        return json_answer(page(list(self.assistants.values()), call.query))

    def get_assistant(self, call: Call) -> Answer:
        return json_answer(self._assistant(call.arg("assistant_id")))

    def modify_assistant(self, call: Call) -> Answer:
        assistant, body = self._assistant(call.arg("assistant_id")), call.json()
        if "model" in body:
            self.catalog.resolve(body["model"], "assistants")
        assistant |= {
            key: value for key, value in body.items() if key in assistant and key not in ("id", "object")
        }
        return json_answer(assistant)

    def delete_assistant(self, call: Call) -> Answer:
        assistant = self._assistant(call.arg("assistant_id"))
        del self.assistants[assistant["id"]]
        return json_answer(deleted(assistant["id"], "assistant.deleted"))

    def _assistant(self, assistant_id: object) -> Obj:
        return find(self.assistants, "Assistant", str(assistant_id))

    # threads and messages

    def create_thread(self, call: Call) -> Answer:
        return json_answer(self._new_thread(call.json()))

    def _new_thread(self, body: dict[str, Any]) -> Obj:
        thread: Obj = {"id": new_id("thread_"), "object": "thread", "created_at": now()}
        thread |= {"metadata": body.get("metadata") or {}, "tool_resources": body.get("tool_resources") or {}}
        self.threads[thread["id"]] = thread
        self.messages[thread["id"]] = {}
        self.runs[thread["id"]] = {}
        for message in body.get("messages") or []:
            self._add_message(thread["id"], message)
        return thread

    def modify_thread(self, call: Call) -> Answer:
        thread, body = self._thread(call), call.json()
        thread |= {key: body[key] for key in ("metadata", "tool_resources") if key in body}
        return json_answer(thread)

    def delete_thread(self, call: Call) -> Answer:
        thread = self._thread(call)
        for store in (self.threads, self.messages, self.runs):
            del store[thread["id"]]
        return json_answer(deleted(thread["id"], "thread.deleted"))

    def _thread(self, call: Call) -> Obj:
        return find(self.threads, "Thread", call.arg("thread_id"))

    def create_message(self, call: Call) -> Answer:
        return json_answer(self._add_message(self._thread(call)["id"], call.json()))

    def list_messages(self, call: Call) -> Answer:
        messages = list(self.messages[self._thread(call)["id"]].values())
        run_id = call.query.get("run_id")
        return json_answer(page([m for m in messages if run_id in (None, m["run_id"])], call.query))

    def get_message(self, call: Call) -> Answer:
        messages = self.messages[self._thread(call)["id"]]
        return json_answer(find(messages, "Message", call.arg("message_id")))

    def _add_message(self, thread_id: str, body: Any, run: Obj | None = None) -> Obj:
        if not isinstance(body, dict) or body.get("role", "user") not in ("user", "assistant"):
            raise bad_request("A message needs a role of user or assistant.", "role")
        content = body.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": str(content or "")}]
        message: Obj = {
            "id": new_id("msg_"),
            "object": "thread.message",
            "created_at": now(),
            "thread_id": thread_id,
        }
        message |= {"role": body.get("role", "user"), "content": [_text_part(part) for part in parts]}
        message |= {
            "assistant_id": run and run["assistant_id"],
            "run_id": run and run["id"],
            "attachments": [],
        }
        message |= {"metadata": body.get("metadata") or {}, "status": "completed", "completed_at": now()}
        message |= {"incomplete_at": None, "incomplete_details": None}
        self.messages[thread_id][message["id"]] = message
        return message

    # runs

    def create_run(self, call: Call) -> Answer:
        return self._start(call, self._thread(call)["id"], call.json())

    def create_thread_and_run(self, call: Call) -> Answer:
        body = call.json()
        self._assistant(body.get("assistant_id"))  # checked before a thread is made for it
        thread = self._new_thread(body.get("thread") or {})
        return self._start(call, thread["id"], body)

    def _start(self, call: Call, thread_id: str, body: dict[str, Any]) -> Answer:
        assistant = self._assistant(body.get("assistant_id"))
        model = body.get("model") or assistant["model"]
        self.catalog.resolve(model, "assistants")
        for message in body.get("additional_messages") or []:
            self._add_message(thread_id, message)
        run: Obj = {"id": new_id("run_"), "object": "thread.run", "created_at": now(), "thread_id": thread_id}
        run |= {
            "assistant_id": assistant["id"],
            "status": "queued",
            "model": model,
            "tools": assistant["tools"],
        }
        run |= {"instructions": body.get("instructions") or assistant["instructions"], "metadata": {}}
        for moment in ("started", "expires", "cancelled", "failed", "completed"):
            run[f"{moment}_at"] = None
        run |= {"last_error": None, "required_action": None, "incomplete_details": None, "usage": None}
        self.runs[thread_id][run["id"]] = run
        self.steps[run["id"]] = []
        if body.get("stream") is True:
            return self._stream(run, answers.answer_pieces(self._prompt(thread_id), call.chunks))
        return json_answer(run)

    def _stream(self, run: Obj, pieces: list[str]) -> Stream:
        """The run as Assistants events: created, queued, in progress, the message in deltas, completed."""
        queued = dict(run)
        in_progress = queued | {"status": "in_progress", "started_at": now()}
        message, step = self._complete(run, pieces)
        head = [
            ("thread.run.created", queued),
            ("thread.run.queued", queued),
            ("thread.run.in_progress", in_progress),
            ("thread.run.step.created", step | {"status": "in_progress", "completed_at": None}),
            ("thread.run.step.in_progress", step | {"status": "in_progress", "completed_at": None}),
            ("thread.message.created", message | {"status": "in_progress", "content": []}),
            ("thread.message.in_progress", message | {"status": "in_progress", "content": []}),
        ]
        deltas = [
            (
                "thread.message.delta",
                {"id": message["id"], "object": "thread.message.delta", "delta": _delta(piece)},
            )
            for piece in pieces
        ]
        tail = [
            ("thread.message.completed", message),
            ("thread.run.step.completed", step),
            ("thread.run.completed", run),
        ]
        events = [sse(data, event) for event, data in (*head, *deltas, *tail)]
        return Stream(
            events, _SSE, range(len(head), len(head) + len(deltas)), trailer=b"event: done\ndata: [DONE]\n\n"
        )

    def _complete(self, run: Obj, pieces: list[str]) -> tuple[Obj, Obj]:
        """Finish `run`: the assistant's answer in the thread, a message-creation step, the usage."""
        prompt = self._prompt(run["thread_id"])
        message = self._add_message(run["thread_id"], {"role": "assistant", "content": "".join(pieces)}, run)
        usage = answers.usage(prompt, len(pieces))
        step: Obj = {
            "id": new_id("step_"),
            "object": "thread.run.step",
            "created_at": now(),
            "run_id": run["id"],
        }
        step |= {
            "assistant_id": run["assistant_id"],
            "thread_id": run["thread_id"],
            "type": "message_creation",
        }
        step |= {"status": "completed", "completed_at": now(), "cancelled_at": None, "failed_at": None}
        step |= {"expired_at": None, "last_error": None, "metadata": {}, "usage": usage}
        step["step_details"] = {"type": "message_creation", "message_creation": {"message_id": message["id"]}}
        self.steps[run["id"]].append(step)
        run |= {
            "status": "completed",
            "started_at": run["started_at"] or now(),
            "completed_at": now(),
            "usage": usage,
        }
        return message, step

    def _prompt(self, thread_id: str) -> dict[str, Any]:
        """The thread as a chat body, so runs answer (and count tokens) as chat does."""
        messages = [
            {
                "role": m["role"],
                "content": " ".join(p["text"]["value"] for p in m["content"] if p["type"] == "text"),
            }
            for m in self.messages[thread_id].values()
        ]
        return {"messages": messages}

    def list_runs(self, call: Call) -> Answer:
        return json_answer(page(list(self.runs[self._thread(call)["id"]].values()), call.query))

    def get_run(self, call: Call) -> Answer:
        run = self._run(call)
        step = _RUN_STEPS.get(run["status"])
        if step == "completed":
            self._complete(run, answers.answer_pieces(self._prompt(run["thread_id"]), call.chunks))
        elif step is not None:
            run["status"] = step
        return json_answer(run)

    def cancel_run(self, call: Call) -> Answer:
        run = self._run(call)
        if run["status"] != "queued":
            raise bad_request(f"Cannot cancel run with status '{run['status']}'.")
        run |= {"status": "cancelling", "cancelled_at": now()}
        return json_answer(run)

    def list_steps(self, call: Call) -> Answer:
        return json_answer(page(self.steps[self._run(call)["id"]], call.query))

    def _run(self, call: Call) -> Obj:
        return find(self.runs[self._thread(call)["id"]], "Run", call.arg("run_id"))


def _text_part(part: Any) -> Obj:
    """Message content as stored: `{"type": "text", "text": {"value", "annotations"}}`, from any input form."""
    if isinstance(part, dict) and isinstance(part.get("text"), dict):
        return part
    text = part.get("text", "") if isinstance(part, dict) else part
    return {"type": "text", "text": {"value": str(text), "annotations": []}}


def _delta(piece: str) -> Obj:
    return {"content": [{"index": 0, "type": "text", "text": {"value": piece, "annotations": []}}]}
