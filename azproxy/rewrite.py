"""How an Azure answer changes on its way back: errors always into OpenAI's shape (keeping Azure's details),
whole answers and streams too when AZPROXY_RESPONSE_SHAPE=openai."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .shape import EventReshaper, reshape_answer

_TYPES_BY_STATUS: Final = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


@dataclass(frozen=True, slots=True)
class Rewrite:
    #: The model the client asked for, and the map that chose its deployment (for messages about it).
    model: str | None
    model_map: Mapping[str, str]
    openai_shape: bool

    def error(self, status: int, body: bytes) -> bytes:
        """Azure's `{"error": {"code", "message", ...}}` with OpenAI's `type` and `param` added, nothing removed."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return body
        error = document.get("error") if isinstance(document, dict) else None
        if not isinstance(error, dict):
            return body
        error.setdefault("param", None)
        error.setdefault("code", None)
        if error.get("type") is None:
            error["type"] = _TYPES_BY_STATUS.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            )
        if error.get("code") == "DeploymentNotFound" and self.model is not None:
            error["message"] = f"{error.get('message', '')} {self._mapping_hint()}".strip()
        return json.dumps(document).encode()

    def answer(self, body: bytes) -> tuple[bytes, str | None]:
        """The answer in the shape asked for, and the model Azure named where `model` now says another."""
        return reshape_answer(body, self.model) if self.openai_shape else (body, None)

    def events(self) -> EventReshaper | None:
        return EventReshaper(self.model) if self.openai_shape else None

    def _mapping_hint(self) -> str:
        assert self.model is not None
        deployment = self.model_map.get(self.model, self.model)
        how = "mapped" if self.model in self.model_map else "passed unmapped"
        return (
            f"(azproxy {how} model '{self.model}' to deployment '{deployment}'; if your deployment has another "
            f"name, add it to AZURE_OPENAI_MODEL_MAPPER, e.g. {self.model}=YOUR-DEPLOYMENT.)"
        )


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")
