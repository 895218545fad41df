"""The deployment-scoped operations: text, embeddings, images and audio, on a deployment Azure already resolved."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from aiohttp import web

from . import answers, media
from .calls import Answer, AzureError, Call, Stream, bad_request, headers, json_answer, sse
from .deployments import Deployment
from .multipart import Form

#: The operations named in the URL path after `/deployments/{name}/` (or after `/v1/`, the body naming the deployment).
OPERATIONS: Final = (
    "chat/completions",
    "completions",
    "embeddings",
    "images/generations",
    "images/edits",
    "images/variations",
    "audio/transcriptions",
    "audio/translations",
    "audio/speech",
)
#: Operations whose body is multipart/form-data, their deployment (on v1) in the `model` form field.
MULTIPART_OPERATIONS: Final = frozenset(
    {"images/edits", "images/variations", "audio/transcriptions", "audio/translations"}
)
_SSE: Final = "text/event-stream; charset=utf-8"
_SPEECH_CHUNKS: Final = 4
#: What reasoning deployments refuse in a chat body, checked in this order, the first one found answered
#: (Azure's "Azure OpenAI reasoning models" guide, "Not supported" parameters; the error shape is Azure's 400).
_REASONING_REFUSED: Final = (
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)


def named_deployment(call: Call, operation: str) -> object:
    """Where a v1 call names its deployment: the `model` of its JSON body or of its form."""
    if operation in MULTIPART_OPERATIONS:
        return call.multipart().fields.get("model")
    return call.json().get("model")


def answer(call: Call, operation: str, deployment: Deployment, model: str) -> Answer:
    """The answer of `deployment`; `model` is the one it names (model-router's pick, else the deployment's)."""
    if operation in MULTIPART_OPERATIONS:
        form = call.multipart()
        if operation.startswith("audio/"):
            return _transcription(operation, form)
        return _image_edit(operation, form)
    body = call.json()
    if operation == "images/generations":
        return _images(str(body.get("prompt", "")), body)
    if operation == "audio/speech":
        return _speech(call, body)
    chat = operation == "chat/completions"
    if chat and deployment.reasoning:
        _refuse_unsupported(body)
    if answers.FILTER_TRIGGER in answers.prompt_text(body):
        return json_answer(answers.content_filter_refusal(), status=400)
    if operation == "embeddings":
        return json_answer(answers.embeddings(body, deployment.model))
    pieces = answers.answer_pieces(body, call.chunks)
    if body.get("stream") is True:
        if chat:
            events = list(answers.chat_stream(body, model, pieces, async_filter=call.async_filter))
        else:
            events = list(answers.completion_stream(body, model, pieces))
        first_content = 2 if chat else 1  # after the filter-only chunk (and the role chunk in chat)
        return Stream(
            [sse(event) for event in events],
            _SSE,
            range(first_content, first_content + answers.content_span(events[first_content:])),
            trailer=b"data: [DONE]\n\n",
        )
    document = (answers.chat_completion if chat else answers.text_completion)(body, model, pieces)
    return json_answer(document)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Azure's 400 for the first parameter a reasoning model does not take (a null value counts as absent)."""
    for name in _REASONING_REFUSED:
        if body.get(name) is not None:
            hint = " Use 'max_completion_tokens' instead." if name == "max_tokens" else ""
            raise AzureError(
                400,
                "unsupported_parameter",
                f"Unsupported parameter: '{name}' is not supported with this model.{hint}",
                type="invalid_request_error",
                param=name,
            )


def _images(prompt: str, options: Mapping[str, Any]) -> web.Response:
    """Generations (JSON options) and edits (form fields) answer alike: `n` images, URLs unless `b64_json`."""
    if not prompt:
        raise bad_request("The prompt is required.", "prompt")
    if answers.FILTER_TRIGGER in prompt:
        return json_answer(media.image_refusal(), status=400)
    try:
        count = int(options.get("n") or 1)
    except (TypeError, ValueError):
        raise bad_request("n must be an integer.", "n") from None
    if not 1 <= count <= 10:
        raise bad_request("n must be between 1 and 10.", "n")
    return json_answer(media.images(prompt, count, options.get("response_format") == "b64_json"))


def _image_edit(operation: str, form: Form) -> web.Response:
    """Edits and variations take the image as `image` (or `image[]` for several), edits a `prompt` too."""
    if "image" not in form.files and "image[]" not in form.files:
        raise bad_request("An image file is required.", "image")
    prompt = form.fields.get("prompt", "")
    if operation == "images/variations":
        prompt = prompt or "a variation of the uploaded image"
    return _images(prompt, form.fields)


def _transcription(operation: str, form: Form) -> web.Response:
    upload = form.files.get("file")
    if upload is None:
        raise bad_request("The audio file is required.", "file")
    task = "translate" if operation == "audio/translations" else "transcribe"
    text = media.transcript(task, upload.filename, len(upload.content))
    content_type, body = media.transcription(task, text, form.fields.get("response_format", "json"))
    if isinstance(body, dict):
        return json_answer(body)
    return web.Response(text=body, content_type=content_type, headers=headers())


def _speech(call: Call, body: dict[str, Any]) -> Stream:
    """TTS audio, sent in several chunks as Azure streams it."""
    text, voice = body.get("input"), body.get("voice")
    if not isinstance(text, str) or not text:
        raise bad_request("The input text is required.", "input")
    if not voice:
        raise bad_request("The voice is required.", "voice")
    response_format = body.get("response_format") or "mp3"
    if response_format not in media.SPEECH_FORMATS:
        raise AzureError(400, "BadRequest", f"Unsupported response_format: {response_format}.")
    audio = media.speech(text, response_format)
    count = max(1, call.chunks or _SPEECH_CHUNKS)
    return Stream(_split(audio, count), media.SPEECH_FORMATS[response_format][0], range(count))


def _split(data: bytes, count: int) -> Iterator[bytes]:
    size = -(-len(data) // count)
    return (data[i : i + size] for i in range(0, len(data), size))
