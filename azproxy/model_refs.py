"""Models a request names without its own `model` field, so that a client's allowlist holds for them too.

A run names only its assistant (which has a model); a batch names its deployments inside the JSONL file it
reads, uploaded earlier with `purpose=batch`. These are read as Azure will read them: the assistant as Azure
stores it, the batch file's lines as JSON documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Final

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import bodies
from .clients import Client
from .errors import BadRequest, Forbidden, ProxyError
from .operations import Scope, operation_path
from .routing import target_of
from .translate import IncomingRequest, Plan, plan_request, to_upstream

if TYPE_CHECKING:
    from .state import ProxyState

#: Fetches an OpenAI path (`/v1/assistants/asst_1`) from the backend the request would go to: the body of a
#: 200 answer, or None when there is none.
Lookup = Callable[[str], Awaitable[bytes | None]]

_RUN_PATH: Final = re.compile(r"threads/(?:[^/]+/)?runs")
#: Azure ids are URL-safe tokens; anything else cannot name an object and is not looked up.
_OBJECT_ID: Final = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
#: The most azproxy reads of an assistant or a batch input file to learn its models (Azure's file limit).
MAX_LOOKUP: Final = 200 * 1024 * 1024


async def check_indirect_models(
    state: ProxyState, client: Client, plan: Plan, incoming: IncomingRequest
) -> None:
    """For a client with a model allowlist, every model a resource request makes Azure use is checked too."""
    operation = plan.operation
    if client.models is None or operation is None or operation.scope is not Scope.RESOURCE:
        return
    content_type = incoming.headers.get("Content-Type", "")
    lookup = _backend_lookup(state, incoming)
    for model in await models_named_indirectly(
        incoming.method, incoming.path, content_type, incoming.body, lookup
    ):
        state.admission.check_model(client, model, state.settings.model_map)


def _backend_lookup(state: ProxyState, incoming: IncomingRequest) -> Lookup:
    """GETs an OpenAI path through the same translator and backends as the request itself, with its
    credentials; only an uncompressed 200 of bounded size counts."""
    headers = CIMultiDict(incoming.headers)
    for name in ("Accept-Encoding", "Content-Type", "Content-Length"):
        headers.popall(name, None)

    async def lookup(path: str) -> bytes | None:
        url = URL(path)
        probe = IncomingRequest(
            "GET", url.raw_path_qs, url.path, url.query, CIMultiDictProxy(headers), b"", incoming.request_id
        )
        try:
            plan = plan_request(probe, state.settings.mode)
            sent = await state.upstream.send(
                partial(to_upstream, plan, probe), target_of(plan, probe.headers)
            )
        except ProxyError:
            return None
        response = sent.response
        try:
            if response.status != 200 or "Content-Encoding" in response.headers:
                return None
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_LOOKUP:
                    return None
            return bytes(body)
        except (aiohttp.ClientError, TimeoutError):
            return None
        finally:
            response.release()

    return lookup


async def models_named_indirectly(
    method: str, path: str, content_type: str, body: bytes, lookup: Lookup
) -> list[str]:
    """Every model the request makes Azure use besides its top-level `model` (which is checked already)."""
    if method != "POST":
        return []
    relative = operation_path(path)
    if relative == "files" and content_type.lower().startswith("multipart/form-data"):
        return _batch_upload_models(body, content_type)
    if not (_RUN_PATH.fullmatch(relative) or relative == "batches") or not body.strip():
        return []
    document = bodies.json_document(body)
    if relative == "batches":
        return await _batch_input_models(document.get("input_file_id"), lookup)
    if document.get("model") is None:
        return [await _assistant_model(document.get("assistant_id"), lookup)]
    return []


async def _assistant_model(assistant_id: object, lookup: Lookup) -> str:
    if not isinstance(assistant_id, str) or not _OBJECT_ID.fullmatch(assistant_id):
        raise BadRequest("A run needs an assistant_id.", param="assistant_id", code="invalid_assistant_id")
    answer = await lookup(f"/v1/assistants/{assistant_id}")
    model = _json_field(answer, "model")
    if model is None:
        raise Forbidden(
            f"azproxy cannot tell which model assistant '{assistant_id}' uses, so it cannot check it against "
            "this client's models; name the model in the run.",
            param="assistant_id",
            code="model_not_allowed",
        )
    return model


def _batch_upload_models(body: bytes, content_type: str) -> list[str]:
    purpose = bodies.form_field(body, content_type, "purpose")
    if purpose is None or purpose.value.strip() != "batch":
        return []
    upload = bodies.form_field(body, content_type, "file", text=False)
    return list(_jsonl_models(body[upload.start : upload.end])) if upload is not None else []


async def _batch_input_models(file_id: object, lookup: Lookup) -> list[str]:
    if not isinstance(file_id, str) or not _OBJECT_ID.fullmatch(file_id):
        return []  # Azure refuses the batch itself
    content = await lookup(f"/v1/files/{file_id}/content")
    if content is None:
        raise Forbidden(
            f"azproxy cannot read batch input file '{file_id}' to check the models it names.",
            param="input_file_id",
            code="model_not_allowed",
        )
    return list(_jsonl_models(content))


def _jsonl_models(content: bytes) -> Iterator[str]:
    """The `body.model` of each line of a batch input file; a line that is not a request is Azure's to refuse."""
    for line in content.splitlines():
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except (ValueError, RecursionError):
            raise BadRequest(
                "A line of the batch file is not JSON.", param="file", code="invalid_batch"
            ) from None
        request_body = request.get("body") if isinstance(request, dict) else None
        model = request_body.get("model") if isinstance(request_body, dict) else None
        if not isinstance(model, str):
            raise BadRequest(
                "Every line of a batch file must name its model.", param="file", code="invalid_batch"
            )
        yield model


def _json_field(answer: bytes | None, name: str) -> str | None:
    try:
        document = json.loads(answer) if answer is not None else None
    except (ValueError, RecursionError):
        return None
    value = document.get(name) if isinstance(document, dict) else None
    return value if isinstance(value, str) and value else None
