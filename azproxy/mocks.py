"""Answers azproxy gives itself for what Azure lacks: model listing, CORS preflight, health."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from aiohttp import web

from .browser import preflight_headers
from .errors import NotFound

#: A fixed creation time: Azure's deployments have none that OpenAI clients could read.
_CREATED: Final = 1_700_000_000
_ALLOWED_METHODS: Final = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
_BASE_ALLOWED_HEADERS: Final = ("authorization", "content-type", "api-key")


def model_list(model_map: Mapping[str, str]) -> list[dict[str, object]]:
    """The mapped model names and their deployments, each once, in OpenAI's model shape."""
    ids: dict[str, str] = {}
    for model, deployment in model_map.items():
        ids.setdefault(model, deployment)
        ids.setdefault(deployment, deployment)
    return [
        {
            "id": model_id,
            "object": "model",
            "created": _CREATED,
            "owned_by": "azure",
            "deployment": deployment,
        }
        for model_id, deployment in sorted(ids.items())
    ]


def list_models(model_map: Mapping[str, str]) -> web.Response:
    return web.json_response({"object": "list", "data": model_list(model_map)})


def get_model(model_map: Mapping[str, str], model_id: str) -> web.Response:
    for entry in model_list(model_map):
        if entry["id"] == model_id:
            return web.json_response(entry)
    raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")


def preflight(request: web.Request) -> web.Response:
    """CORS preflight for any path, reached only by origins azproxy answers (the browser policy refused the
    others): what OpenAI clients always send, plus the header names asked for (openai-*, x-stainless-*, ...),
    and a page's way to a loopback or private address (Chrome's Private Network Access) when asked."""
    allowed = dict.fromkeys([*_BASE_ALLOWED_HEADERS, *preflight_headers(request.headers)])
    headers = {
        "Access-Control-Allow-Methods": _ALLOWED_METHODS,
        "Access-Control-Allow-Headers": ", ".join(allowed),
        "Access-Control-Max-Age": "86400",
    }
    if request.headers.get("Access-Control-Request-Private-Network", "").lower() == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return web.Response(status=204, headers=headers)


def health() -> web.Response:
    return web.json_response({"status": "ok"})
